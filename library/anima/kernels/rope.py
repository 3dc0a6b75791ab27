"""Rotate-half RoPE, `x·cos + rotate_half(x)·sin`, as one Triton pass forward and one backward.

torch runs it as about five broadcast elementwise kernels forward (the cos/sin casts, two products, the
rotation's cat and negation, the sum) and more backward, each reading the strided (B, heads, L, hd) query
or key again. Here each pass reads x (or the gradient) once through its strides and writes the result
once, in the input's layout, which is what torch's elementwise ops give the attention after them.

Rounding, exactly as torch's: with halves x1 = x[..., :hd/2], x2 = x[..., hd/2:] and r() the rounding to
x's dtype, c = r(cos), s = r(sin),
    forward   y1 = r(r(x1·c1) − r(x2·s1)),      y2 = r(r(x2·c2) + r(x1·s2));
    backward  gx1 = r(r(g1·c1) + r(g2·s2)),     gx2 = r(r(g2·c2) − r(g1·s1)),
the backward being autograd's: the product's grad r(g·c), the rotation's adjoint of r(g·s) (the cat's
halves swapped, the negated one negated back), summed with one rounding. autograd also adds the +0
padding of the two slices' grads, which turns a −0 sum into +0; the kernel does the same.
"""

from __future__ import annotations

import torch

from library.anima.kernels.common import DTYPES, triton

if triton is not None:
    import triton.language as tl

    from networks.kernels.triton_common import round_to

    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, rows, H, L, sxb, sxh, sxl, syb, syh, syl,
                     HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
                     DTYPE: tl.constexpr, BACKWARD: tl.constexpr):  # fmt: skip
        # rows run over (b, l, h), heads fastest: consecutive rows are adjacent in the model's
        # (B, L, heads, hd) buffer and share one cos/sin row
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        j = tl.arange(0, BLOCK_H)
        h = r % H
        l = (r // H) % L  # noqa: E741
        b = r // (H * L)
        mask = (r < rows)[:, None] & (j < HALF)[None, :]
        xo = (b * sxb + h * sxh + l * sxl)[:, None] + j[None, :]
        co = (l * (2 * HALF))[:, None] + j[None, :]
        a1 = tl.load(x_ptr + xo, mask=mask, other=0.0).to(tl.float32)
        a2 = tl.load(x_ptr + xo + HALF, mask=mask, other=0.0).to(tl.float32)
        c1 = round_to(tl.load(cos_ptr + co, mask=mask, other=0.0).to(tl.float32), DTYPE)
        c2 = round_to(tl.load(cos_ptr + co + HALF, mask=mask, other=0.0).to(tl.float32), DTYPE)
        s1 = round_to(tl.load(sin_ptr + co, mask=mask, other=0.0).to(tl.float32), DTYPE)
        s2 = round_to(tl.load(sin_ptr + co + HALF, mask=mask, other=0.0).to(tl.float32), DTYPE)
        if BACKWARD:
            y1 = round_to(round_to(a1 * c1, DTYPE) + round_to(a2 * s2, DTYPE), DTYPE)
            y2 = round_to(round_to(a2 * c2, DTYPE) - round_to(a1 * s1, DTYPE), DTYPE)
            y1 = tl.where(y1 == 0.0, 0.0, y1)
            y2 = tl.where(y2 == 0.0, 0.0, y2)
        else:
            y1 = round_to(round_to(a1 * c1, DTYPE) - round_to(a2 * s1, DTYPE), DTYPE)
            y2 = round_to(round_to(a2 * c2, DTYPE) + round_to(a1 * s2, DTYPE), DTYPE)
        yo = (b * syb + h * syh + l * syl)[:, None] + j[None, :]
        out_ty = y_ptr.dtype.element_ty
        tl.store(y_ptr + yo, y1.to(out_ty), mask=mask)
        tl.store(y_ptr + yo + HALF, y2.to(out_ty), mask=mask)


BLOCK_R = 16


def supports(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Shapes the kernel covers: x (B, heads, L, hd) with hd even and unit stride along hd; cos and sin
    one (L, hd) table (leading dims of size 1), floating point, on x's device, needing no grad."""
    if x.dim() != 4 or x.shape[-1] % 2 or x.stride(-1) != 1 or x.numel() == 0:
        return False
    for t in (cos, sin):
        if t.shape[-2:] != x.shape[-2:] or t.numel() != x.shape[-2] * x.shape[-1]:
            return False
        if not t.is_floating_point() or t.requires_grad or t.device != x.device:
            return False
    return True


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    bsz, heads, length, hd = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty_like(x)  # x's layout where x is dense, else contiguous
    rows = bsz * heads * length
    half = hd // 2
    grid = (triton.cdiv(rows, BLOCK_R),)
    _rope_kernel[grid](x, cos, sin, y, rows, heads, length, x.stride(0), x.stride(1), x.stride(2),
                       y.stride(0), y.stride(1), y.stride(2), HALF=half,
                       BLOCK_H=triton.next_power_of_2(half), BLOCK_R=BLOCK_R,
                       DTYPE=DTYPES.index(x.dtype), BACKWARD=backward, num_warps=4)  # fmt: skip
    return y


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _launch(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        cos, sin = ctx.saved_tensors
        return _launch(g, cos, sin, backward=True), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`layers.apply_rope` through the kernel, bit for bit (cos and sin rounded to x's dtype inside, as
    the torch path's casts do). The caller checks `common.usable(x)` and `supports(x, cos, sin)`."""
    n = x.shape[-2] * x.shape[-1]
    cos, sin = (t.reshape(n).contiguous() for t in (cos, sin))
    return _Rope.apply(x, cos, sin)
