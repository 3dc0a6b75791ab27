"""fp8 weight -> 16/32-bit weight in one Triton pass: the CUDA path of `networks.fp8.dequantize`.

torch's fp8 -> bf16 copy is not vectorised. In the H100 end-to-end profile (docs/benchmarks.md, session 9)
those copies took about 55 ms of a 0.49 s SDXL LoKr batch-4 step: ~2400 upcasts (forward, the
checkpoint's recompute and grad-x of every fp8 layer), several times what their bytes need at the GPU's
bandwidth. The kernel reads each fp8 byte once and writes the result, with torch's exact rounding:

- plain fp8: the value itself (every e4m3 value is exact in bf16, fp16 and fp32);
- scaled fp8 (`--fp8_scaled`): torch computes `w8.to(dtype) * scale.to(dtype)`, i.e. the scale rounded
  to `dtype`, the product in fp32, rounded to nearest-even in `dtype`. The kernel does the same
  (`triton_common.round_to`).
"""

from __future__ import annotations

import functools

import torch

from networks.kernels.triton_common import ROUNDED, enabled, triton

ENV = "FP8_DEQUANT_KERNEL"  # on (default where usable) | off: the torch path everywhere
BLOCK = 2048

if triton is not None:
    import triton.language as tl

    from networks.kernels.triton_common import round_to

    @triton.jit
    def _dequant_kernel(w_ptr, s_ptr, out_ptr, n, cols, HAS_SCALE: tl.constexpr, OUT: tl.constexpr,
                        BLOCK: tl.constexpr):  # fmt: skip
        # OUT: index in ROUNDED (bf16, fp16, fp32): the rounding of the scale and of the product
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            s = tl.load(s_ptr + offs // cols, mask=mask, other=1.0)
            w = round_to(w * round_to(s, OUT), OUT)
        tl.store(out_ptr + offs, w.to(out_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _native_fp8(device_index: int) -> bool:
    """Compute capability 8.9+, asked once per device (dequantize runs ~2400 times a step)."""
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


def usable(w8: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> bool:
    """Whether the CUDA path takes the kernel: a contiguous e4m3 weight on a GPU with native fp8
    conversions (compute capability 8.9+), an output dtype it covers, not while torch.compile traces
    (inductor fuses the cast itself), and not switched off by FP8_DEQUANT_KERNEL=off."""
    if not (w8.is_cuda and enabled(ENV) and w8.dtype == torch.float8_e4m3fn and dtype in ROUNDED):
        return False
    if not w8.is_contiguous() or (scale is not None and (scale.numel() != w8.shape[0] or not scale.is_cuda)):
        return False
    return _native_fp8(w8.device.index)


def dequantize(w8: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """fp8 (× per-row scale) in `dtype`, equal bit for bit to `networks.fp8`'s torch path. Any device
    Triton runs on (the CPU under TRITON_INTERPRET=1, for the tests)."""
    if triton is None:
        raise RuntimeError("fp8_dequant: Triton is not installed")
    if dtype not in ROUNDED:
        raise ValueError(f"fp8_dequant: output dtype {dtype} is not one of {ROUNDED}")
    w8 = w8.contiguous()
    out = torch.empty(w8.shape, dtype=dtype, device=w8.device)
    n = w8.numel()
    if n == 0:
        return out
    cols = n // w8.shape[0]
    s = scale.reshape(-1).float().contiguous() if scale is not None else w8
    grid = (triton.cdiv(n, BLOCK),)
    _dequant_kernel[grid](w8, s, out, n, cols, HAS_SCALE=scale is not None, OUT=ROUNDED.index(dtype),
                          BLOCK=BLOCK, num_warps=8)  # fmt: skip
    return out
