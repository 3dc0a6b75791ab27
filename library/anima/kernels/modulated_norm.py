"""adaLN's modulated LayerNorm in one Triton pass each way: the CUDA-autocast path of the DiT blocks.

Under CUDA autocast, `modulate(layer_norm(x), scale, shift)` casts the bf16 residual to fp32 (layer_norm is
an fp32 autocast op), writes the fp32 LayerNorm output, writes the fp32 modulated tensor, and every linear
that reads it casts it back to bf16 (three times for q/k/v). Backward mirrors that in fp32. The kernel
reads x once and writes the half-precision result the linears would have cast, with the same maths:

    y = half(shift + LN(x)·(1 + scale))     LN statistics in fp32; 1 + scale rounded to half first, as
                                            torch adds a Python scalar to a half tensor; the product and
                                            the sum rounded separately in fp32, as torch's addcmul does

It returns one output per consumer (views of one buffer), so their gradients reach backward separately and
are summed in fp32 there, as autograd sums the fp32 grads of separate casts. Backward, per row, in fp32:

    g = Σ g_i,  gh = g·(1 + scale),  grad_x = half(rstd·(gh − mean(gh) − x̂·mean(gh·x̂)))
    grad_shift = half(Σ_tokens g),  grad_scale = half(Σ_tokens g·x̂)   (fp32 products and sums)

Token sums are per-program partial rows summed by torch afterwards: deterministic, no atomics. The results
equal torch's to fp32 rounding before the final rounding to half precision (docs/anima.md states which
elements may differ). Roundings to half are `triton_common.round_to`'s.
"""

from __future__ import annotations

import torch

from library.anima.kernels.common import DTYPES, ENV
from networks.kernels.triton_common import enabled, triton

_ROWS_PER_PROGRAM = 32  # backward: rows whose token sums one program accumulates

if triton is not None:
    import triton.language as tl

    from networks.kernels.triton_common import round_to

    @triton.jit
    def _fwd_kernel(x_ptr, scale_ptr, shift_ptr, y_ptr, mean_ptr, rstd_ptr, L, D, sc_stride, sh_stride, eps,
                    DTYPE: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        b = row // L
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / D
        xc = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt_rn(tl.sum(xc * xc, axis=0) / D + eps)
        scale = tl.load(scale_ptr + b * sc_stride + cols, mask=mask, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + b * sh_stride + cols, mask=mask, other=0.0).to(tl.float32)
        y = round_to((xc * rstd) * round_to(1.0 + scale, DTYPE) + shift, DTYPE)
        tl.store(y_ptr + row * D + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(mean_ptr + row, mean)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _bwd_kernel(x_ptr, scale_ptr, mean_ptr, rstd_ptr, g0_ptr, g1_ptr, g2_ptr, dx_ptr, dshift_ptr,
                    dscale_ptr, L, D, s_stride, programs_per_batch, N: tl.constexpr, DTYPE: tl.constexpr,
                    ROWS: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
        # One program: ROWS consecutive tokens of one batch element. N (1..3) grads are summed in fp32.
        pid = tl.program_id(0).to(tl.int64)
        b = pid // programs_per_batch
        first = (pid % programs_per_batch) * ROWS
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        scale1 = round_to(1.0 + tl.load(scale_ptr + b * s_stride + cols, mask=mask, other=0.0).to(tl.float32),
                          DTYPE)  # fmt: skip
        acc_g = tl.zeros((BLOCK_D,), dtype=tl.float32)
        acc_gx = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for i in range(ROWS):
            ok = first + i < L
            row = b * L + first + i
            m = mask & ok
            offs = row * D + cols
            g = tl.load(g0_ptr + offs, mask=m, other=0.0).to(tl.float32)
            if N > 1:
                g += tl.load(g1_ptr + offs, mask=m, other=0.0).to(tl.float32)
            if N > 2:
                g += tl.load(g2_ptr + offs, mask=m, other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + row, mask=ok, other=0.0)
            rstd = tl.load(rstd_ptr + row, mask=ok, other=0.0)
            x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
            xhat = tl.where(m, x - mean, 0.0) * rstd
            gh = g * scale1
            c_x = tl.sum(gh * xhat, axis=0) / D
            c_1 = tl.sum(gh, axis=0) / D
            dx = round_to(((gh - c_1) - xhat * c_x) * rstd, DTYPE)
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)
            acc_g += g
            acc_gx += g * xhat
        tl.store(dshift_ptr + pid * D + cols, acc_g, mask=mask)
        tl.store(dscale_ptr + pid * D + cols, acc_gx, mask=mask)


def _launch_options(block_d: int) -> dict:
    # fp fusion off: the product and the sum round separately (no FMA), as in torch's addcmul and in
    # Triton's CPU interpreter
    return {"num_warps": max(1, min(8, block_d // 256)), "enable_fp_fusion": False}


def usable(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, norm: torch.nn.LayerNorm) -> bool:
    """Whether `norm(x)·(1 + scale) + shift` takes the kernel: a CUDA (B, L, D) tensor under CUDA autocast
    whose dtype is autocast's half dtype (the case whose fp32 intermediates it removes; without autocast
    the maths stays torch's), scale and shift (B, 1, D) of that dtype, a LayerNorm without affine weights
    over D, Triton importable, not while torch.compile traces (inductor fuses these itself), and not
    switched off by ANIMA_KERNELS=off."""
    if not x.is_cuda or not enabled(ENV):
        return False
    if not torch.is_autocast_enabled("cuda"):
        return False
    dtype = torch.get_autocast_dtype("cuda")
    if dtype not in DTYPES or not (x.dtype == scale.dtype == shift.dtype == dtype) or x.dim() != 3:
        return False
    b, _, d = x.shape
    if norm.weight is not None or norm.bias is not None or tuple(norm.normalized_shape) != (d,):
        return False
    return tuple(scale.shape) == tuple(shift.shape) == (b, 1, d) and shift.device == scale.device == x.device


def _rows_of(scale: torch.Tensor) -> torch.Tensor:
    """(B, 1, D) -> (B, D) with unit column stride (a copy only if it had none)."""
    s = scale.reshape(scale.shape[0], scale.shape[-1])
    return s if s.stride(-1) == 1 else s.contiguous()


class _ModulatedNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, shift, eps: float, n: int):
        x = x.contiguous()
        b, seq, d = x.shape
        sc, sh = _rows_of(scale), _rows_of(shift)
        y = torch.empty_like(x)
        mean = torch.empty(b * seq, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        block_d = triton.next_power_of_2(d)
        if b * seq:
            _fwd_kernel[(b * seq,)](x, sc, sh, y, mean, rstd, seq, d, sc.stride(0), sh.stride(0), eps,
                                    DTYPE=DTYPES.index(x.dtype), BLOCK_D=block_d,
                                    **_launch_options(block_d))  # fmt: skip
        ctx.save_for_backward(x, sc, mean, rstd)
        ctx.scale_meta = (scale.shape, scale.dtype)
        ctx.shift_meta = (shift.shape, shift.dtype)
        ctx.set_materialize_grads(False)
        if n == 1:
            return y
        # views of one buffer: each is its own output, so each consumer's grad arrives separately
        return tuple(y.view(y.shape) for _ in range(n))

    @staticmethod
    def backward(ctx, *grads):
        x, sc, mean, rstd = ctx.saved_tensors
        gs = [g.contiguous() for g in grads if g is not None]
        if not gs:
            return None, None, None, None, None
        b, seq, d = x.shape
        rows = min(_ROWS_PER_PROGRAM, max(seq, 1))
        per_batch = triton.cdiv(seq, rows)
        dx = torch.empty_like(x)
        dshift = torch.empty(b * per_batch, d, dtype=torch.float32, device=x.device)
        dscale = torch.empty_like(dshift)
        block_d = triton.next_power_of_2(d)
        if b * per_batch:
            g = gs + [gs[0]] * (3 - len(gs))  # unused pointer slots (N says how many are read)
            _bwd_kernel[(b * per_batch,)](x, sc, mean, rstd, g[0], g[1], g[2], dx, dshift, dscale, seq, d,
                                          sc.stride(0), per_batch, N=len(gs), DTYPE=DTYPES.index(x.dtype),
                                          ROWS=rows, BLOCK_D=block_d, **_launch_options(block_d))  # fmt: skip

        def token_sum(part: torch.Tensor, meta: tuple) -> torch.Tensor:
            return part.view(b, per_batch, d).sum(1).to(meta[1]).view(meta[0])

        needs = ctx.needs_input_grad
        return (
            dx if needs[0] else None,
            token_sum(dscale, ctx.scale_meta) if needs[1] else None,
            token_sum(dshift, ctx.shift_meta) if needs[2] else None,
            None,
            None,
        )


def modulated_layer_norm(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float, n: int = 1
) -> tuple[torch.Tensor, ...]:
    """n tensors equal to half(LayerNorm(x.float())·(1 + scale) + shift), one per consumer (n ≤ 3), each
    carrying its own gradient back. x (B, L, D) bf16/fp16; scale and shift (B, 1, D) of x's dtype. Any
    device Triton runs on (the CPU under TRITON_INTERPRET=1, for the tests)."""
    if triton is None:
        raise RuntimeError("modulated_norm: Triton is not installed")
    if not 1 <= n <= 3:
        raise ValueError(f"modulated_norm: n (consumers) must be 1, 2 or 3, got {n}")
    if x.dtype not in DTYPES or scale.dtype != x.dtype or shift.dtype != x.dtype:
        raise ValueError(f"modulated_norm: x, scale, shift must share one half dtype, got "
                         f"{x.dtype}, {scale.dtype}, {shift.dtype}")  # fmt: skip
    out = _ModulatedNorm.apply(x, scale, shift, float(eps), n)
    return (out,) if n == 1 else out
