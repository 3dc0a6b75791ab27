"""LoHa ΔW (Hadamard product of two low-rank halves) with memory-lean custom autograd.

The custom Functions save only the factors, not the O×I products: backward recomputes them
(the saved activations stay those of the factors). The Tucker backward takes each half's dw_a from its OWN chain.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from networks.kernels import loha_delta

from .common import Scale, apply_weight, autocast_like_forward, save_autocast_state, scaled_grad
from .fused_linear import DeltaRule


def _scale_grad(grad_out: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, scale: torch.Tensor):
    # ΔW = s·P1⊙P2 ⇒ ∂L/∂s = Σ G⊙P1⊙P2, returned in the scale's own shape/dtype.
    return (grad_out * p1 * p2).sum().reshape(scale.shape).to(scale.dtype)


class HadaWeight(torch.autograd.Function):
    """ΔW = s·(w1a@w1b) ⊙ (w2a@w2b); w1a/w2a (O, r), w1b/w2b (r, M) → (O, M)."""

    @staticmethod
    def forward(ctx, w1a, w1b, w2a, w2b, scale):  # type: ignore[override]
        if isinstance(scale, torch.Tensor):
            ctx.save_for_backward(w1a, w1b, w2a, w2b, scale)
            ctx.scale_is_tensor = True
        else:
            ctx.save_for_backward(w1a, w1b, w2a, w2b)
            ctx.scale_is_tensor = False
            ctx.scale = scale
        save_autocast_state(ctx, w1a)
        # Fold s into the smallest factor (O×r) rather than the O×M product.
        return ((w1a * scale) @ w1b) * (w2a @ w2b)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        with autocast_like_forward(ctx):
            return HadaWeight._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        if ctx.scale_is_tensor:
            w1a, w1b, w2a, w2b, scale = ctx.saved_tensors
        else:
            w1a, w1b, w2a, w2b = ctx.saved_tensors
            scale = ctx.scale
        need = ctx.needs_input_grad
        factors = (w1a, w1b, w2a, w2b)
        if len(need) > 4 and need[4]:  # a trained σ needs both products too: form them once
            p1, p2 = w1a @ w1b, w2a @ w2b
            grads = hada_grads(scaled_grad(grad_out, scale), factors, need[:4], products=(p1, p2))
            return (*grads, _scale_grad(grad_out, p1, p2, scale))
        return (*hada_grads(scaled_grad(grad_out, scale), factors, need[:4]), None)


def hada_delta(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """(w1a@w1b) ⊙ (w2a@w2b), with any scale already folded into w1a. On CUDA one Triton pass writes it
    (networks/kernels/loha_delta.py) where that kernel takes the factors."""
    delta = loha_delta.try_build(factors)
    if delta is not None:
        return delta
    w1a, w1b, w2a, w2b = factors
    return (w1a @ w1b) * (w2a @ w2b)


def hada_grads(
    grad: torch.Tensor,
    factors: Sequence[torch.Tensor],
    need: Sequence[bool],
    products: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[torch.Tensor | None]:
    """Grads of Σ grad⊙hada_delta(factors) to (w1a, w1b, w2a, w2b). The O×I products w1a@w1b and w2a@w2b are
    recomputed one at a time rather than saved, unless the caller already holds them (`products`). On CUDA,
    without `products`, one Triton pass over `grad` gives all four where that kernel takes the factors and pays
    (loha_delta.grads_pays: large layers)."""
    kernel = loha_delta.try_grads(grad, factors, need) if products is None else None
    if kernel is not None:
        return kernel
    w1a, w1b, w2a, w2b = factors
    p1, p2 = products if products is not None else (None, None)
    out: list[torch.Tensor | None] = [None] * 4
    if need[0] or need[1]:
        m1 = grad * (w2a @ w2b if p2 is None else p2)
        out[0] = m1 @ w1b.T if need[0] else None
        out[1] = w1a.T @ m1 if need[1] else None
        del m1
    if need[2] or need[3]:
        m2 = grad * (w1a @ w1b if p1 is None else p1)
        out[2] = m2 @ w2b.T if need[2] else None
        out[3] = w2a.T @ m2 if need[3] else None
    return out


# the fused Linear node's rule (functional/fused_linear.py): s rides on w1a; on CUDA the build kernel casts
# the fp32 factors itself (four cast launches fewer per build)
LOHA_RULE = DeltaRule("loha", hada_delta, hada_grads, scaled_index=0, raw_build=loha_delta.try_build_raw)


def tucker_half(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """R[o,i,x,y] = Σ_{p,q} t[p,q,x,y]·wa[p,o]·wb[q,i]; t (r,r,kh,kw), wa (r,O), wb (r,I)."""
    own = torch.einsum("pqxy,qi->pixy", t, wb)
    return torch.einsum("po,pixy->oixy", wa, own)


def _tucker_half_grads(t, wa, wb, m, need):
    """Grads of Σ m⊙R(t, wa, wb) for one Tucker half (m = Ĝ ⊙ other half)."""
    dt = dwa = dwb = None
    if need[1]:
        own = torch.einsum("pqxy,qi->pixy", t, wb)  # U: this half's own chain
        dwa = torch.einsum("oixy,pixy->po", m, own)
        del own
    if need[0] or need[2]:
        v = torch.einsum("po,oixy->pixy", wa, m)
        if need[2]:
            dwb = torch.einsum("pixy,pqxy->qi", v, t)
        if need[0]:
            dt = torch.einsum("pixy,qi->pqxy", v, wb)
    return dt, dwa, dwb


class HadaWeightTucker(torch.autograd.Function):
    """ΔW = s·R(t1,w1a,w1b) ⊙ R(t2,w2a,w2b) → (O, I, kh, kw); w*a (r, O), w*b (r, I)."""

    @staticmethod
    def forward(ctx, t1, w1a, w1b, t2, w2a, w2b, scale):  # type: ignore[override]
        if isinstance(scale, torch.Tensor):
            ctx.save_for_backward(t1, w1a, w1b, t2, w2a, w2b, scale)
            ctx.scale_is_tensor = True
        else:
            ctx.save_for_backward(t1, w1a, w1b, t2, w2a, w2b)
            ctx.scale_is_tensor = False
            ctx.scale = scale
        save_autocast_state(ctx, w1a)
        return tucker_half(t1, w1a * scale, w1b) * tucker_half(t2, w2a, w2b)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        with autocast_like_forward(ctx):
            return HadaWeightTucker._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        if ctx.scale_is_tensor:
            t1, w1a, w1b, t2, w2a, w2b, scale = ctx.saved_tensors
        else:
            t1, w1a, w1b, t2, w2a, w2b = ctx.saved_tensors
            scale = ctx.scale
        need = ctx.needs_input_grad
        g = scaled_grad(grad_out, scale)
        r2 = tucker_half(t2, w2a, w2b)
        g1 = g2 = (None, None, None)
        if any(need[0:3]):
            g1 = _tucker_half_grads(t1, w1a, w1b, g * r2, need[0:3])
        r1 = tucker_half(t1, w1a, w1b)
        if any(need[3:6]):
            g2 = _tucker_half_grads(t2, w2a, w2b, g * r1, need[3:6])
        dscale = _scale_grad(grad_out, r1, r2, scale) if len(need) > 6 and need[6] else None
        return (*g1, *g2, dscale)


def loha_delta_weight(
    w1a: torch.Tensor,
    w1b: torch.Tensor,
    w2a: torch.Tensor,
    w2b: torch.Tensor,
    scale: Scale,
    t1: torch.Tensor | None = None,
    t2: torch.Tensor | None = None,
    shape: tuple[int, ...] | torch.Size | None = None,
) -> torch.Tensor:
    """LoHa ΔW via the custom autograd Functions, reshaped to `shape` (W's shape) when given.

    Linear/flat: w1a, w2a (O, r); w1b, w2b (r, I·K) (a 4-D (r, I, kh, kw) b-factor is flattened).
    Tucker: t1, t2 (r, r, kh, kw); w1a, w2a (r, O); w1b, w2b (r, I).
    A flat conv result (O, I·K) is reshaped row-major to (O, I, kh, kw).
    """
    if (t1 is None) != (t2 is None):
        raise ValueError(
            "loha_delta_weight: hada_t1 and hada_t2 must be given together (Tucker) or not at all"
        )
    if t1 is not None:
        r1, r2 = t1.shape[0], t2.shape[0]
        if (
            t1.dim() != 4
            or t2.dim() != 4
            or t1.shape[:2] != (r1, r1)
            or t2.shape[:2] != (r2, r2)
            or t1.shape[2:] != t2.shape[2:]
            or w1a.shape[0] != r1
            or w1b.shape[0] != r1
            or w2a.shape[0] != r2
            or w2b.shape[0] != r2
            or w1a.shape[1] != w2a.shape[1]
            or w1b.shape[1] != w2b.shape[1]
        ):
            raise ValueError(
                "loha_delta_weight: Tucker factor shapes do not chain: "
                f"t1 {tuple(t1.shape)}, w1a {tuple(w1a.shape)}, w1b {tuple(w1b.shape)}, t2 {tuple(t2.shape)}, "
                f"w2a {tuple(w2a.shape)}, w2b {tuple(w2b.shape)}; expected (r, r, kh, kw), (r, O), (r, I) per half"
            )
        delta = HadaWeightTucker.apply(t1, w1a, w1b, t2, w2a, w2b, scale)
    else:
        w1b = w1b.reshape(w1b.shape[0], -1)
        w2b = w2b.reshape(w2b.shape[0], -1)
        if w1a.shape[1] != w1b.shape[0] or w2a.shape[1] != w2b.shape[0] or w1a.shape[0] != w2a.shape[0]:
            raise ValueError(
                "loha_delta_weight: factor shapes do not chain: "
                f"w1a {tuple(w1a.shape)}, w1b {tuple(w1b.shape)}, w2a {tuple(w2a.shape)}, "
                f"w2b {tuple(w2b.shape)}; expected (O, r), (r, I·K), (O, r), (r, I·K)"
            )
        delta = HadaWeight.apply(w1a, w1b, w2a, w2b, scale)
    if shape is not None and tuple(delta.shape) != tuple(shape):
        if delta.numel() != math.prod(int(d) for d in shape):
            raise ValueError(
                f"loha_delta_weight: ΔW of shape {tuple(delta.shape)} cannot be reshaped to the layer "
                f"weight shape {tuple(shape)}"
            )
        delta = delta.reshape(shape)
    return delta


def khatri_rao_factors(
    w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor, scale: Scale
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A1∗A2)·s of shape (O, r1·r2) and (B1•B2) of shape (r1·r2, I·K) whose product is ΔW."""
    left = ((w1a * scale)[:, :, None] * w2a[:, None, :]).reshape(w1a.shape[0], -1)
    b1 = w1b.reshape(w1b.shape[0], -1)
    b2 = w2b.reshape(w2b.shape[0], -1)
    right = (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])
    return left, right


class KhatriRaoLinear(torch.autograd.Function):
    """out = s·x·((A1∗A2)(B1•B2))ᵀ for a linear LoHa, saving only x and the four thin factors.

    Backward rebuilds the (O, r²) and (r², I) Khatri–Rao factors and the N×r² middle, so this path
    keeps less alive than the rebuild's O×I ΔW (and much less than plain autograd, which would keep
    both r²-wide factors and the middle)."""

    @staticmethod
    def forward(ctx, x, w1a, w1b, w2a, w2b, scale):  # type: ignore[override]
        if isinstance(scale, torch.Tensor):
            ctx.save_for_backward(x, w1a, w1b, w2a, w2b, scale)
            ctx.scale_is_tensor = True
        else:
            ctx.save_for_backward(x, w1a, w1b, w2a, w2b)
            ctx.scale_is_tensor = False
            ctx.scale = scale
        save_autocast_state(ctx, x)
        left, right = khatri_rao_factors(w1a, w1b, w2a, w2b, scale)
        return F.linear(F.linear(x, right), left)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        if ctx.scale_is_tensor:
            x, w1a, w1b, w2a, w2b, scale = ctx.saved_tensors
        else:
            x, w1a, w1b, w2a, w2b = ctx.saved_tensors
            scale = ctx.scale
        need = ctx.needs_input_grad
        r1, r2 = w1a.shape[1], w2a.shape[1]
        dx = d1a = d1b = d2a = d2b = dscale = None
        with autocast_like_forward(ctx):
            left, right = khatri_rao_factors(w1a, w1b, w2a, w2b, scale)
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            x2 = x.reshape(-1, x.shape[-1])
            if need[1] or need[3] or need[5]:  # grads through the (O, r²) side: w1a, w2a, scale
                dleft = (g2.transpose(0, 1) @ F.linear(x2, right)).reshape(-1, r1, r2)  # middle recomputed
                if need[1]:
                    d1a = scaled_grad(torch.einsum("opq,oq->op", dleft, w2a), scale)
                if need[3]:
                    d2a = torch.einsum("opq,op->oq", dleft, w1a * scale)
                if len(need) > 5 and need[5]:
                    dscale = torch.einsum("opq,op,oq->", dleft, w1a, w2a).reshape(scale.shape).to(scale.dtype)
                del dleft
            if need[0] or need[2] or need[4]:
                dh = g2 @ left
                if need[0]:
                    dx = (dh @ right).reshape(x.shape)
                if need[2] or need[4]:
                    dright = (dh.transpose(0, 1) @ x2).reshape(r1, r2, -1)
                    d1b = torch.einsum("pqi,qi->pi", dright, w2b) if need[2] else None
                    d2b = torch.einsum("pqi,pi->qi", dright, w1b) if need[4] else None
        return dx, d1a, d1b, d2a, d2b, dscale


def loha_khatri_rao_linear(
    x: torch.Tensor, w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor, scale: Scale
) -> torch.Tensor:
    """s·x·ΔWᵀ for a linear LoHa without building ΔW: (A1B1)⊙(A2B2) = (A1∗A2)(B1•B2).

    Costs 2N·r²(O+I) FLOPs forward (+ a recompute of the N×r² middle in backward); worthwhile when
    r² < O·I/(O+I). x: (..., I) → (..., O).
    """
    if w1a.shape[1] != w1b.shape[0] or w2a.shape[1] != w2b.shape[0] or w1b.shape[1] != x.shape[-1]:
        raise ValueError(
            "loha_khatri_rao_linear: factor shapes do not chain with the input: "
            f"w1a {tuple(w1a.shape)}, w1b {tuple(w1b.shape)}, w2a {tuple(w2a.shape)}, w2b {tuple(w2b.shape)}, "
            f"x (..., {x.shape[-1]}); expected (O, r1), (r1, I), (O, r2), (r2, I)"
        )
    return KhatriRaoLinear.apply(x, w1a, w1b, w2a, w2b, scale)


def loha_khatri_rao_conv(
    x: torch.Tensor,
    w1a: torch.Tensor,
    w1b: torch.Tensor,
    w2a: torch.Tensor,
    w2b: torch.Tensor,
    scale: Scale,
    org_module: torch.nn.Conv2d,
) -> torch.Tensor:
    """Flat-conv LoHa Khatri–Rao bypass: a k×k conv to r² channels (with the layer's
    stride/padding), then a 1×1 channel mix to O."""
    if org_module.groups != 1:
        raise ValueError(f"loha_khatri_rao_conv: groups={org_module.groups} is not supported; expected 1")
    left, right = khatri_rao_factors(w1a, w1b, w2a, w2b, scale)
    kernel = right.reshape(right.shape[0], org_module.in_channels, *org_module.kernel_size)
    h = apply_weight(x, kernel, org_module)
    return torch.nn.functional.conv2d(h, left[:, :, None, None])


__all__ = [
    "HadaWeight",
    "HadaWeightTucker",
    "KhatriRaoLinear",
    "khatri_rao_factors",
    "loha_delta_weight",
    "loha_khatri_rao_conv",
    "loha_khatri_rao_linear",
    "tucker_half",
]
