"""LoKr ΔW = s·kron(W1, W2), the factorization rule, and bypasses that never build ΔW."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from networks.kernels import kron_delta

from .common import Scale, autocast_like_forward, save_autocast_state, scaled_grad
from .fused_linear import DeltaRule


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """Split `dim` into (m, n) with m·n = dim and m ≤ n.

    If factor > 0 divides dim the pair is sorted(factor, dim/factor). Otherwise (factor −1 = no
    limit) m is the largest divisor of dim not above min(factor, √dim).
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"factorization: dim must be a positive int, got {dim!r}")
    if isinstance(factor, bool) or not isinstance(factor, int) or factor == 0 or factor < -1:
        raise ValueError(f"factorization: factor must be -1 or a positive int, got {factor!r}")
    if factor > 0 and dim % factor == 0:
        other = dim // factor
        return (factor, other) if factor <= other else (other, factor)
    limit = math.isqrt(dim) if factor < 0 else min(factor, math.isqrt(dim))
    m = next(m for m in range(limit, 0, -1) if dim % m == 0)  # limit ≥ 1, and 1 always divides
    return m, dim // m


def make_w1(
    w1: torch.Tensor | None = None, w1a: torch.Tensor | None = None, w1b: torch.Tensor | None = None
) -> torch.Tensor:
    """W1 (a, c): the full `lokr_w1`, or `lokr_w1_a` (a, r) @ `lokr_w1_b` (r, c)."""
    if w1 is not None:
        if w1a is not None or w1b is not None:
            raise ValueError("make_w1: give either lokr_w1 or lokr_w1_a/lokr_w1_b, not both")
        return w1
    if w1a is None or w1b is None:
        raise ValueError("make_w1: need lokr_w1, or both lokr_w1_a and lokr_w1_b")
    return w1a @ w1b


def make_w2(
    w2: torch.Tensor | None = None,
    w2a: torch.Tensor | None = None,
    w2b: torch.Tensor | None = None,
    t2: torch.Tensor | None = None,
    kernel_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """W2: (b, d) for linear / 1×1 conv, (b, d, kh, kw) for a k×k conv.

    Full `lokr_w2` may arrive as (b, d), (b, d, 1, 1) (LyCORIS 1×1 files) or (b, d, kh, kw).
    Low-rank: w2a (b, r) @ w2b (r, d·K) (or (r, d, kh, kw)). Tucker: t2 (r, r, kh, kw),
    w2a (r, b), w2b (r, d), W2[q,j,x,y] = Σ t2[p',q',x,y]·w2a[p',q]·w2b[q',j].
    """
    k = tuple(kernel_size) if kernel_size is not None else (1, 1)
    big_kernel = k != (1, 1)
    kk = k[0] * k[1]
    if w2 is not None:
        if w2a is not None or w2b is not None or t2 is not None:
            raise ValueError(
                "make_w2: give either lokr_w2 or the lokr_w2_a/lokr_w2_b(/lokr_t2) factors, not both"
            )
        if not big_kernel:
            if w2.dim() == 4 and w2.shape[2:] == (1, 1):
                return w2.reshape(w2.shape[0], w2.shape[1])
            if w2.dim() != 2:
                raise ValueError(f"make_w2: lokr_w2 of shape {tuple(w2.shape)} does not fit kernel {k}")
            return w2
        if w2.dim() == 4 and tuple(w2.shape[2:]) == k:
            return w2
        if w2.dim() == 2 and w2.shape[1] % kk == 0:
            return w2.reshape(w2.shape[0], w2.shape[1] // kk, *k)
        raise ValueError(f"make_w2: lokr_w2 of shape {tuple(w2.shape)} does not fit kernel {k}")
    if w2a is None or w2b is None:
        raise ValueError("make_w2: need lokr_w2, or both lokr_w2_a and lokr_w2_b")
    if t2 is not None:
        if not big_kernel or t2.dim() != 4 or tuple(t2.shape[2:]) != k:
            raise ValueError(f"make_w2: lokr_t2 of shape {tuple(t2.shape)} does not fit kernel {k}")
        core = torch.einsum("pqxy,qj->pjxy", t2, w2b)
        return torch.einsum("pb,pjxy->bjxy", w2a, core)
    rank = w2b.shape[0]
    if w2a.dim() != 2 or w2a.shape[1] != rank:
        raise ValueError(
            f"make_w2: lokr_w2_a {tuple(w2a.shape)} and lokr_w2_b {tuple(w2b.shape)} do not chain; "
            "expected (b, r) and (r, d·K)"
        )
    flat = w2a @ w2b.reshape(rank, -1)
    if not big_kernel:
        return flat
    if flat.shape[1] % kk:
        raise ValueError(f"make_w2: lokr_w2_b of shape {tuple(w2b.shape)} does not fit kernel {k}")
    return flat.reshape(flat.shape[0], flat.shape[1] // kk, *k)


def lokr_delta_weight(
    w1: torch.Tensor | None,
    w1a: torch.Tensor | None,
    w1b: torch.Tensor | None,
    w2: torch.Tensor | None,
    w2a: torch.Tensor | None,
    w2b: torch.Tensor | None,
    t2: torch.Tensor | None,
    scale: Scale,
    shape: tuple[int, ...] | torch.Size,
) -> torch.Tensor:
    """ΔW = s·kron(W1, W2) reshaped to `shape` (W's shape: (O, I) or (O, I, kh, kw))."""
    shape = tuple(int(s) for s in shape)
    kernel = shape[2:] if len(shape) == 4 else None
    big1 = make_w1(w1, w1a, w1b) * scale  # scale the smallest tensor
    big2 = make_w2(w2, w2a, w2b, t2, kernel)
    if big2.dim() == 4:  # a view, as indexing with None would give, for less host time
        big1 = big1.view(big1.shape[0], big1.shape[1], 1, 1)
    delta = torch.kron(big1, big2)
    if delta.numel() != math.prod(shape):
        raise ValueError(
            f"lokr_delta_weight: kron(W1 {tuple(big1.shape[:2])}, W2 {tuple(big2.shape)}) gives "
            f"{tuple(delta.shape)}, which does not fit the layer weight shape {shape}"
        )
    return delta.reshape(shape)


def kron_grads(
    grad: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    need: tuple[bool, bool],
    reduce_form: bool | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Grads of Σ grad⊙kron(W1, W2) to W1 (a, c) and W2 (b, d), grad (a·b, c·d).

    grad is read in place as G[i, k, j, l] (ΔW[i·b + k, j·d + l] = W1[i, j]·W2[k, l]), never permuted into a
    copy. Eager: batched products over its (i, k) row blocks. Under torch.compile (`reduce_form` None → auto)
    a broadcast multiply and sum, which inductor fuses into one pass over G (H100 run 19: the batched products
    were 2 % slower there).
    """
    (a, c), (b, d) = w1.shape, w2.shape
    if reduce_form is None:
        reduce_form = torch.compiler.is_compiling()
    g1 = g2 = None
    if reduce_form:
        blocks4 = grad.reshape(a, b, c, d)
        if need[0]:  # ∂W1[i, j] = Σ_k Σ_l G[i, k, j, l]·W2[k, l]
            g1 = (blocks4 * w2.reshape(1, b, 1, d)).sum((1, 3))
        if need[1]:  # ∂W2[k, l] = Σ_i Σ_j W1[i, j]·G[i, k, j, l]
            g2 = (blocks4 * w1.reshape(a, 1, c, 1)).sum((0, 2))
        return g1, g2
    blocks = grad.reshape(a * b, c, d)  # block (i, k): the c×d matrix G[i, k, :, :]
    if need[0]:
        w2_cols = w2.unsqueeze(0).expand(a, b, d).reshape(a * b, d, 1)
        g1 = torch.bmm(blocks, w2_cols).view(a, b, c).sum(1)
    if need[1]:
        w1_rows = w1.unsqueeze(1).expand(a, b, c).reshape(a * b, 1, c)
        g2 = torch.bmm(w1_rows, blocks).view(a, b, d).sum(0)
    return g1, g2


def _lokr_rule(w1_lowrank: bool, w2_lowrank: bool) -> DeltaRule:
    """The fused Linear node's rule for one LoKr layout; factors in file order
    (lokr_w1 | lokr_w1_a, lokr_w1_b), (lokr_w2 | lokr_w2_a, lokr_w2_b); s rides on the first."""
    n1 = 2 if w1_lowrank else 1

    def halves(f: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        w1 = f[0] @ f[1] if w1_lowrank else f[0]
        w2 = f[n1] @ f[n1 + 1] if w2_lowrank else f[n1]
        return w1, w2

    def build(f: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.kron(*halves(f))

    def grads(
        grad: torch.Tensor, f: Sequence[torch.Tensor], need: Sequence[bool]
    ) -> list[torch.Tensor | None]:
        w1, w2 = halves(f)
        need1, need2 = any(need[:n1]), any(need[n1:])
        g1, g2 = kron_grads(grad, w1, w2, (need1, need2))
        out: list[torch.Tensor | None] = []
        for lowrank, g, a_b, needs in (
            (w1_lowrank, g1, f[:n1], need[:n1]),
            (w2_lowrank, g2, f[n1:], need[n1:]),
        ):
            if not lowrank:
                out.append(g)
            else:  # W = A·B: ∂A = ∂W·Bᵀ, ∂B = Aᵀ·∂W
                out.append(g @ a_b[1].T if needs[0] else None)
                out.append(a_b[0].T @ g if needs[1] else None)
        return out

    name = f"lokr (w1 {'low-rank' if w1_lowrank else 'full'}, w2 {'low-rank' if w2_lowrank else 'full'})"
    # full/full (most of SDXL's LoKr layers): on CUDA one kernel casts the factors and writes kron (two cast
    # launches fewer per build); a low-rank half keeps the casts and torch's products
    raw = kron_delta.try_build_raw if not (w1_lowrank or w2_lowrank) else None
    return DeltaRule(name, build, grads, scaled_index=0, raw_build=raw)


LOKR_RULES = {(l1, l2): _lokr_rule(l1, l2) for l1 in (False, True) for l2 in (False, True)}


def _check_linear_bypass(x: torch.Tensor, c: int, d: int) -> None:
    if x.shape[-1] != c * d:
        raise ValueError(f"LoKr bypass: input has {x.shape[-1]} features, expected c·d = {c}·{d} = {c * d}")


class KronBypassLinear(torch.autograd.Function):
    """z = s·W1·(X·W2ᵀ) with X = x viewed (..., c, d); saves x, W1, W2 only and recomputes
    Y = X·W2ᵀ (N·c·b values, more than ΔW when N > √(OI)) in backward."""

    @staticmethod
    def forward(ctx, xv, w1, w2, scale):  # type: ignore[override]
        if isinstance(scale, torch.Tensor):
            ctx.save_for_backward(xv, w1, w2, scale)
            ctx.scale_is_tensor = True
        else:
            ctx.save_for_backward(xv, w1, w2)
            ctx.scale_is_tensor = False
            ctx.scale = scale
        save_autocast_state(ctx, xv)
        return torch.matmul(w1 * scale, F.linear(xv, w2))

    @staticmethod
    def backward(ctx, grad_z):  # type: ignore[override]
        with autocast_like_forward(ctx):
            if ctx.scale_is_tensor:
                xv, w1, w2, scale = ctx.saved_tensors
            else:
                xv, w1, w2 = ctx.saved_tensors
                scale = ctx.scale
            need = ctx.needs_input_grad
            dx = dw1 = dw2 = dscale = None
            y = F.linear(xv, w2)  # (..., c, b), recomputed
            if need[1] or need[3]:
                # Σ over all leading axes of gz·Yᵀ: (a, b) × (c, b) → (a, c)
                gy_t = torch.einsum("...ab,...cb->ac", grad_z, y)
                if need[1]:
                    dw1 = scaled_grad(gy_t, scale)
                if need[3]:
                    dscale = (gy_t * w1).sum().reshape(scale.shape).to(scale.dtype)
            del y
            if need[0] or need[2]:
                gy = torch.matmul((w1 * scale).transpose(0, 1), grad_z)  # (..., c, b)
                if need[0]:
                    dx = torch.matmul(gy, w2)  # (..., c, d)
                if need[2]:
                    dw2 = torch.einsum("...cb,...cd->bd", gy, xv)
        return dx, dw1, dw2, dscale


def lokr_bypass_linear(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, scale: Scale) -> torch.Tensor:
    """s·x·kron(W1, W2)ᵀ without building ΔW. x (..., c·d), W1 (a, c), W2 (b, d) → (..., a·b).

    x viewed as (..., c, d): Y = X·W2ᵀ (..., c, b), Z = W1·Y (..., a, b), flattened. Y is not kept
    for backward (KronBypassLinear recomputes it).
    """
    c, d = w1.shape[1], w2.shape[1]
    _check_linear_bypass(x, c, d)
    z = KronBypassLinear.apply(x.reshape(*x.shape[:-1], c, d), w1, w2, scale)
    return z.reshape(*x.shape[:-1], -1)
