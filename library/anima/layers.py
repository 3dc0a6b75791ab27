"""Pieces both halves of the Anima model use: the two RMSNorm flavours, rotate-half RoPE and the gated
residual (the last two through Triton kernels on CUDA, `library.anima.kernels`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from library.anima.kernels import common, residual, rope


def _rms_normalise(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dimension, computed in fp32 whatever x's dtype."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    """DiT RMSNorm: normalise in fp32, cast back to the input dtype, then scale by the weight.

    torch's `rms_norm` does the first two steps in one kernel (fp32 inside, the input's dtype out) where
    the spelled-out version takes six elementwise passes over an fp32 copy, forward and backward; the
    DiT runs it on every query and key. Autocast is off around it so the output keeps the input's dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            y = F.rms_norm(x, (x.shape[-1],), eps=self.eps)
        return y * self.weight


class LLMAdapterRMSNorm(RMSNorm):
    """Adapter RMSNorm: fp32 variance; cast to the weight dtype only when that is half precision."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _rms_normalise(x, self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            y = y.to(self.weight.dtype)
        return self.weight * y


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin with cos and sin cast to x's dtype; x (B, heads, L, hd), cos and sin
    broadcastable (…, L, hd), j paired with j + hd/2. One Triton pass each way where the kernels apply
    (`library.anima.kernels.common.usable`), bit for bit the torch path's result and grads."""
    if common.usable(x) and rope.supports(x, cos, sin):
        return rope.apply_rope(x, cos, sin)
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """x + gate·out, gate (B, 1, D) over every token of x and out (B, L, D). One Triton pass each way
    where the kernels apply: the result and the grads of x and out bit for bit the torch path's, gate's
    grad within fp32 summation order (`library.anima.kernels.residual`)."""
    if common.usable(x, gate, out) and residual.supports(x, gate, out):
        return residual.gated_residual(x, gate, out)
    return x + gate * out
