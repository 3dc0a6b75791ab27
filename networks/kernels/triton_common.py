"""What the Triton kernels share: Triton itself when importable, whether a kernel may take a call, and
torch's rounding of an fp32 result to a 16-bit dtype.

The kernels keep torch's roundings, so their results are the torch path's bit for bit: a bf16 or fp16 op
in torch computes in fp32 and rounds to nearest-even. `round_to` rounds to bf16 with integer arithmetic,
which Triton's CPU interpreter (the tests' way in) follows exactly where its own float -> bf16 cast may
not; fp16 goes through Triton's cast, which rounds to nearest-even on both.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

ROUNDED = (torch.bfloat16, torch.float16, torch.float32)  # index = round_to's DTYPE


def interpreting() -> bool:
    """Triton's CPU interpreter is on: kernels then run on CPU tensors (the tests' way in)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def enabled(env: str) -> bool:
    """Triton importable, the kernel's switch `env` not set to off (read at every call), and torch.compile
    not tracing (inductor fuses the torch path's ops itself)."""
    if triton is None or os.environ.get(env, "on") == "off":
        return False
    return not torch.compiler.is_compiling()


def same_device_kind(tensors: Sequence[torch.Tensor]) -> bool:
    """All on one CUDA device, or all on the CPU while the interpreter runs."""
    if all(t.is_cuda for t in tensors):
        return len({t.device for t in tensors}) == 1
    return interpreting() and all(t.device.type == "cpu" for t in tensors)


@contextlib.contextmanager
def switched_off(env: str) -> Iterator[None]:
    """The kernel switch `env` set to off for the block (the tests' and benchmarks' torch path)."""
    old = os.environ.get(env)
    os.environ[env] = "off"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(env, None)
        else:
            os.environ[env] = old


if triton is not None:

    @triton.jit
    def round_to(x, DTYPE: tl.constexpr):
        """fp32 -> the fp32 value of the nearest bf16 (DTYPE 0) or fp16 (DTYPE 1), ties to even; DTYPE 2
        (fp32) keeps x. Infinities stay; NaN stays NaN (the integer rounding could carry a NaN whose high
        payload bits are zero into inf)."""
        if DTYPE == 0:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return tl.where(x == x, bits.to(tl.float32, bitcast=True), x)
        elif DTYPE == 1:
            return x.to(tl.float16).to(tl.float32)
        else:
            return x
