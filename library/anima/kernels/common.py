"""What the Anima kernels share: their switch, their dtypes, and whether a call takes the RoPE and
gated-residual kernels.

The kernels replace chains of torch elementwise ops whose every intermediate is rounded to the 16-bit
dtype; they keep each of those roundings (`networks.kernels.triton_common.round_to`), so the results are
the torch path's bit for bit.
"""

from __future__ import annotations

import torch

from networks.kernels.triton_common import ROUNDED, enabled, interpreting, triton

__all__ = ["DTYPES", "ENV", "interpreting", "triton", "usable"]

ENV = "ANIMA_KERNELS"  # on (default, CUDA tensors) | off: the torch path everywhere
DTYPES = ROUNDED[:2]  # the half dtypes; index = the kernels' DTYPE constexpr, as in round_to


# On an H100 (torch 2.11, Triton 3.6) the fp16 variants differed from torch's bits at the real shapes while
# bf16 matched (docs/benchmarks.md, session 10): on CUDA only bf16 takes the kernels; the interpreter,
# whose maths the tests check, runs both.
GPU_DTYPES = (torch.bfloat16,)


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels take a call on these tensors: Triton importable, not switched off by
    ANIMA_KERNELS=off, not while torch.compile traces (inductor fuses these ops itself), every tensor
    bf16 on a CUDA device, or every one bf16 or every one fp16 on the CPU under Triton's interpreter."""
    if not enabled(ENV):
        return False
    dtype = tensors[0].dtype
    if dtype not in DTYPES or any(t.dtype != dtype for t in tensors):
        return False
    if all(t.is_cuda for t in tensors):
        return dtype in GPU_DTYPES
    return interpreting() and not any(t.is_cuda for t in tensors)
