"""A layer's ΔW as a plain LoRA by truncated SVD (the best rank-r approximation in the Frobenius norm), with
sd-scripts' dynamic rank rules. Pure tensor maths: no files, no modules."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")


@dataclass
class LoraFactors:
    """down (r, I[, kh, kw]) and up (O, r[, 1, 1]) with up·down = the rank-r ΔW (α = r, so scale 1)."""

    down: torch.Tensor
    up: torch.Tensor
    rank: int
    norm: float  # ‖ΔW‖_F
    error: float  # ‖ΔW − up·down‖_F = √(Σ discarded σ²)
    max_ratio: float  # σ_max / σ_min of the kept values

    @property
    def rel_error(self) -> float:
        return self.error / self.norm if self.norm > 0 else 0.0

    @property
    def fro_retained(self) -> float:
        return math.sqrt(max(0.0, 1.0 - self.rel_error**2))


def choose_rank(s: torch.Tensor, max_rank: int, method: str | None = None, param: float | None = None) -> int:
    """How many singular values `s` (descending) to keep: `max_rank`, or with a dynamic method at most that:
    sv_ratio keeps σ > σ_max/param; sv_fro the fewest whose Frobenius share reaches param; sv_cumulative the
    fewest whose share of Σσ reaches param. At least 1, at most len(s)."""
    n = int(s.numel())
    rank = max_rank
    if method is not None:
        assert param is not None
        s = s.double()
        if method == "sv_ratio":
            rank = int((s > s[0] / param).sum())
        elif method == "sv_fro":
            share = (s.square().cumsum(0) / s.square().sum()).sqrt()
            rank = int((share < param - 1e-12).sum()) + 1
        elif method == "sv_cumulative":
            share = s.cumsum(0) / s.sum()
            rank = int((share < param - 1e-12).sum()) + 1
        else:
            raise ValueError(f"dynamic method {method!r}: expected one of {DYNAMIC_METHODS}")
        rank = min(rank, max_rank)
    return max(1, min(rank, n))


def truncated_lora(
    delta: torch.Tensor,
    max_rank: int,
    method: str | None = None,
    param: float | None = None,
) -> LoraFactors:
    """The rank-r LoRA of ΔW (O, I) or (O, I, kh, kw), computed in ΔW's dtype; σ is split evenly between the
    factors (√σ each) so neither carries the whole range in a low-precision save."""
    out_dim = delta.shape[0]
    mat = delta.reshape(out_dim, -1)
    norm = float(mat.norm())
    if norm == 0.0:  # nothing to keep: a rank-1 zero LoRA keeps the module (and its coverage) in the file
        down = mat.new_zeros(1, mat.shape[1])
        up = mat.new_zeros(out_dim, 1)
        s = mat.new_zeros(1)
        rank = 1
    else:
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        rank = choose_rank(s, max_rank, method, param)
        root = s[:rank].sqrt()
        up = u[:, :rank] * root
        down = root[:, None] * vh[:rank]
    error = float(s[rank:].double().square().sum().sqrt()) if s.numel() > rank else 0.0
    kept = s[:rank]
    max_ratio = float(kept[0] / kept[-1]) if float(kept[-1]) > 0 else math.inf
    if delta.dim() == 4:
        down = down.reshape(rank, *delta.shape[1:])
        up = up.reshape(out_dim, rank, 1, 1)
    return LoraFactors(down.contiguous(), up.contiguous(), rank, norm, error, max_ratio)
