"""The DiT block's gated residual, `x + gate·out` with gate (B, 1, D) over every token, one Triton pass
each way.

torch runs it as two broadcast elementwise kernels forward and three backward (grad of out, the product
for gate's grad, its sum over tokens). Rounding follows torch's: y = r(x + r(gate·out)) with r() the
rounding to the dtype; grad x is the incoming gradient g itself; grad out = r(g·gate), bit for bit.

grad gate is torch's sum over tokens of r(g·out), accumulated in fp32 and rounded once. The kernel sums
each tile of tokens in fp32 and writes the partial sums, which torch then adds up in fp32: no atomics, the
same result for the same shapes on every run, but not torch's summation order. So grad gate agrees with
torch's to within fp32 reordering (at most 2(L−1)·2⁻²⁴·Σ|r(g·out)| apart) plus one rounding to the dtype
on each side; it is bitwise equal where the fp32 sums are exact.
"""

from __future__ import annotations

import torch

from library.anima.kernels.common import DTYPES, triton

if triton is not None:
    import triton.language as tl

    from networks.kernels.triton_common import round_to

    @triton.jit
    def _residual_kernel(a_ptr, gate_ptr, out_ptr, y_ptr, part_ptr, L, D, sab, sal, sgb, sob, sol, syb,
                         syl, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, DTYPE: tl.constexpr,
                         BACKWARD: tl.constexpr, GRAD_OUT: tl.constexpr,
                         GRAD_GATE: tl.constexpr):  # fmt: skip
        # forward: a = x, y = r(x + r(gate·out)). backward: a = g, y = r(g·gate) (GRAD_OUT), and per tile
        # of BLOCK_L tokens the fp32 sum of r(g·out) into part[b, tile, :] (GRAD_GATE)
        pl, pd, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        l = pl.to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)  # noqa: E741 - int64: l·stride may pass 2³¹
        d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
        dmask = d < D
        mask = (l < L)[:, None] & dmask[None, :]
        gate = tl.load(gate_ptr + b * sgb + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        a = tl.load(a_ptr + b * sab + (l * sal)[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
        yo = b * syb + (l * syl)[:, None] + d[None, :]
        if BACKWARD:
            if GRAD_OUT:
                tl.store(y_ptr + yo, round_to(a * gate, DTYPE).to(y_ptr.dtype.element_ty), mask=mask)
            if GRAD_GATE:
                o = tl.load(out_ptr + b * sob + (l * sol)[:, None] + d[None, :], mask=mask, other=0.0)
                part = tl.sum(round_to(a * o.to(tl.float32), DTYPE), axis=0)
                tl.store(part_ptr + (b * tl.num_programs(0) + pl) * D + d, part, mask=dmask)
        else:
            o = tl.load(out_ptr + b * sob + (l * sol)[:, None] + d[None, :], mask=mask, other=0.0)
            y = round_to(a + round_to(gate * o.to(tl.float32), DTYPE), DTYPE)
            tl.store(y_ptr + yo, y.to(y_ptr.dtype.element_ty), mask=mask)


BLOCK_L, BLOCK_D = 32, 128


def supports(x: torch.Tensor, gate: torch.Tensor, out: torch.Tensor) -> bool:
    """Shapes the kernel covers: x and out (B, L, D), gate (B, 1, D), each with unit stride along D."""
    if x.dim() != 3 or out.shape != x.shape or gate.shape != (x.shape[0], 1, x.shape[2]):
        return False
    return x.numel() > 0 and all(t.stride(-1) == 1 for t in (x, gate, out))


def _launch(a: torch.Tensor, gate: torch.Tensor, out: torch.Tensor, y: torch.Tensor | None,
            part: torch.Tensor | None, backward: bool, grad_out: bool, grad_gate: bool) -> None:  # fmt: skip
    bsz, length, dim = out.shape
    grid = (triton.cdiv(length, BLOCK_L), triton.cdiv(dim, BLOCK_D), bsz)
    y_strides = (y.stride(0), y.stride(1)) if y is not None else (0, 0)
    _residual_kernel[grid](a, gate, out, y if y is not None else a, part if part is not None else a,
                           length, dim, a.stride(0), a.stride(1), gate.stride(0), out.stride(0),
                           out.stride(1), *y_strides, BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D,
                           DTYPE=DTYPES.index(a.dtype), BACKWARD=backward, GRAD_OUT=grad_out,
                           GRAD_GATE=grad_gate, num_warps=4)  # fmt: skip


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, gate: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, out)
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        _launch(x, gate, out, y, None, backward=False, grad_out=False, grad_gate=False)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        gate, out = ctx.saved_tensors
        need_x, need_gate, need_out = ctx.needs_input_grad
        if not (need_gate or need_out):
            return g if need_x else None, None, None
        if g.stride(-1) != 1:
            g = g.contiguous()
        grad_out = torch.empty(out.shape, dtype=out.dtype, device=out.device) if need_out else None
        part = None
        if need_gate:
            tiles = triton.cdiv(out.shape[1], BLOCK_L)
            part = torch.empty(out.shape[0], tiles, out.shape[2], dtype=torch.float32, device=out.device)
        _launch(g, gate, out, grad_out, part, backward=True, grad_out=need_out, grad_gate=need_gate)
        grad_gate = part.sum(1, keepdim=True).to(gate.dtype) if need_gate else None
        return g if need_x else None, grad_gate, grad_out


def gated_residual(x: torch.Tensor, gate: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`layers.gated_residual` through the kernel (grad gate within fp32 reordering: see the module's
    docstring). The caller checks `common.usable(x, gate, out)` and `supports(x, gate, out)`."""
    return _GatedResidual.apply(x, gate, out)
