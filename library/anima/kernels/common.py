"""What the Anima kernels share: whether a call takes them, and torch's rounding to 16 bits in Triton.

The kernels replace chains of torch elementwise ops whose every intermediate is rounded to the 16-bit
dtype; they keep each of those roundings, so the results are the torch path's bit for bit. A bf16 product
or sum in torch is the fp32 result rounded to nearest-even; the kernels round with integer arithmetic,
which Triton's CPU interpreter (the tests) follows exactly where its own float -> bf16 cast may not.
"""

from __future__ import annotations

import os

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

ENV = "ANIMA_KERNELS"  # on (default, CUDA tensors) | off: the torch path everywhere
DTYPES = (torch.bfloat16, torch.float16)  # index = the kernels' DTYPE constexpr


def interpreting() -> bool:
    """Triton's CPU interpreter is on: the kernels then run on CPU tensors (the tests' way in)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels take a call on these tensors: Triton importable, not switched off by
    ANIMA_KERNELS=off, not while torch.compile traces (inductor fuses these ops itself), every tensor
    bf16 or every one fp16, on a CUDA device (or on the CPU under Triton's interpreter)."""
    if torch.compiler.is_compiling() or triton is None or os.environ.get(ENV, "on") == "off":
        return False
    dtype = tensors[0].dtype
    if dtype not in DTYPES or any(t.dtype != dtype for t in tensors):
        return False
    return all(t.is_cuda for t in tensors) or (interpreting() and not any(t.is_cuda for t in tensors))


if triton is not None:

    @triton.jit
    def round_to(x, DTYPE: tl.constexpr):
        """fp32 -> the fp32 value of the nearest bf16 (DTYPE 0) or fp16 (DTYPE 1), ties to even, as torch
        rounds a 16-bit op's fp32 result. NaN stays NaN (the integer rounding would carry it into inf)."""
        if DTYPE == 0:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return tl.where(x == x, bits.to(tl.float32, bitcast=True), x)
        else:
            return x.to(tl.float16).to(tl.float32)
