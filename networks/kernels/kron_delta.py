"""LoKr's ΔW = kron(s·W1, W2) from the fp32 factors in one Triton pass, with their casts as a by-product.

The fused Linear node (networks/functional/fused_linear.py) casts each factor to the compute dtype, s folded
into W1, then torch.kron multiplies them: three launches a build, each a few µs of fixed cost for a few KB of
work, and SDXL builds 592 full/full LoKr layers twice a step (forward and the checkpoint's recompute). Here
one program per tile of ΔW reads the factors' elements it needs, rounds them as the casts do (s·W1 in fp32
rounded once, W2 rounded once) and writes

    ΔW[i·b + k, j·d + l] = round(round(s·W1[i, j]) · round(W2[k, l]))

The product of two rounded 16-bit values is exact in fp32, so its one rounding is torch.kron's (a 16-bit
mul computes in fp32 and rounds once): ΔW is the casts-then-kron result bit for bit. The casts themselves
are written too (the backward needs them): W1[i, j] by the program holding ΔW[i·b, j·d], W2[k, l] by the
one holding ΔW[k, l], so each element is written once. Only full W1 (a, c) and full W2 (b, d) are taken;
a low-rank half (W = A·B) keeps the casts and torch's build.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from networks.kernels.triton_common import ROUNDED, enabled, same_device_kind, triton

ENV = "KRON_KERNEL"  # on (default where usable) | off: the casts and torch.kron everywhere


class Tiles(NamedTuple):
    """Rows and columns of ΔW per program, and its warps."""

    bo: int
    bi: int
    warps: int


# a 32×128 tile: 32 elements a thread at 4 warps, stores of 256 B a row (not tuned)
CUDA_TILES = Tiles(32, 128, 4)
# the interpreter's: edge tiles along both dimensions at the tests' small shapes
INTERPRETER_TILES = Tiles(16, 16, 1)

if triton is not None:
    import triton.language as tl

    from networks.kernels.triton_common import round_to

    @triton.jit
    def _kron_kernel(w1_ptr, w2_ptr, out_ptr, c1_ptr, c2_ptr, scale, b, c, d, n_rows, n_cols,
                     OUT: tl.constexpr, SCALED: tl.constexpr, STORE1: tl.constexpr, STORE2: tl.constexpr,
                     BO: tl.constexpr, BI: tl.constexpr):  # fmt: skip
        # OUT: index in ROUNDED of the compute dtype; c1/c2: the casts' targets, written where STORE1/STORE2
        ro = tl.program_id(0).to(tl.int64) * BO + tl.arange(0, BO)
        ri = tl.program_id(1).to(tl.int64) * BI + tl.arange(0, BI)
        # ΔW[ro, ri] = W1[row1, col1]·W2[row2, col2]
        row1, row2 = ro // b, ro % b
        col1, col2 = ri // d, ri % d
        inside = (ro[:, None] < n_rows) & (ri[None, :] < n_cols)
        off1 = row1[:, None] * c + col1[None, :]
        off2 = row2[:, None] * d + col2[None, :]
        v1 = tl.load(w1_ptr + off1, mask=inside, other=0.0)
        if SCALED:
            v1 = v1 * scale
        v1 = round_to(v1, OUT)
        v2 = round_to(tl.load(w2_ptr + off2, mask=inside, other=0.0), OUT)
        dt = out_ptr.dtype.element_ty
        tl.store(out_ptr + ro[:, None] * n_cols + ri[None, :], round_to(v1 * v2, OUT).to(dt), mask=inside)
        if STORE1:  # from the element where W2's index is (0, 0)
            tl.store(c1_ptr + off1, v1.to(dt), mask=inside & (row2[:, None] == 0) & (col2[None, :] == 0))
        if STORE2:  # from the element where W1's index is (0, 0)
            tl.store(c2_ptr + off2, v2.to(dt), mask=inside & (row1[:, None] == 0) & (col1[None, :] == 0))


def usable(factors: Sequence[torch.Tensor], dtype: torch.dtype) -> bool:
    """Whether try_build_raw takes the call: Triton importable, KRON_KERNEL not off, not under torch.compile;
    two contiguous 2-D fp32 factors, a non-empty ΔW, a compute dtype in ROUNDED, on one CUDA device (or the
    CPU under the interpreter); not while autograd records through the factors (the kernel's outputs have no
    graph)."""
    if len(factors) != 2 or not enabled(ENV) or dtype not in ROUNDED:
        return False
    if any(
        f.dtype != torch.float32 or f.dim() != 2 or not f.is_contiguous() or f.numel() == 0 for f in factors
    ):
        return False
    if not same_device_kind(factors):
        return False
    return not (torch.is_grad_enabled() and any(f.requires_grad for f in factors))


def try_build_raw(
    factors: Sequence[torch.Tensor], dtype: torch.dtype, scale: float
) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
    """(kron(W1·s, W2) in `dtype`, [W1·s, W2] cast to `dtype`), bit for bit what cast_scaled of each and
    torch.kron of those give, in one launch; None where `usable` does not take the call. A factor that
    cast_scaled would hand back as it is (fp32 compute dtype; W2, or W1 with s = 1) comes back as it is."""
    if not usable(factors, dtype):
        return None
    w1, w2 = factors
    same = dtype == torch.float32
    cast = [w1 if same and scale == 1.0 else torch.empty_like(w1, dtype=dtype),
            w2 if same else torch.empty_like(w2, dtype=dtype)]  # fmt: skip
    return _build(w1, w2, cast, scale), cast


def _build(w1: torch.Tensor, w2: torch.Tensor, cast: list[torch.Tensor], scale: float) -> torch.Tensor:
    """kron(W1·s, W2) in the dtype of `cast` (the casts' targets), writing the targets that are not the
    factors themselves."""
    (a, c), (b, d) = w1.shape, w2.shape
    dtype = cast[0].dtype
    out = torch.empty(a * b, c * d, dtype=dtype, device=w1.device)
    t = CUDA_TILES if w1.is_cuda else INTERPRETER_TILES
    grid = (triton.cdiv(a * b, t.bo), triton.cdiv(c * d, t.bi))
    _kron_kernel[grid](w1, w2, out, *cast, scale, b, c, d, a * b, c * d, OUT=ROUNDED.index(dtype),
                       SCALED=scale != 1.0, STORE1=cast[0] is not w1, STORE2=cast[1] is not w2, BO=t.bo,
                       BI=t.bi, num_warps=t.warps)  # fmt: skip
    return out
