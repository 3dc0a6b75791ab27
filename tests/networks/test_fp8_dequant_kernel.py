"""The Triton fp8 upcast (networks/kernels/fp8_dequant.py) against networks.fp8's torch path, bit for bit.

The kernel runs in Triton's CPU interpreter in a child process (TRITON_INTERPRET must be set before the
kernel is defined, and this process may already have imported it for the GPU); skipped where Triton is not
installed. On a GPU the same comparison runs natively."""

from __future__ import annotations

import torch

from networks import fp8
from networks.kernels import fp8_dequant
from networks.kernels.triton_common import enabled
from tests.helpers.triton_interpreter import HAS_TRITON, run_json

CASES = r"""
import json, torch
from networks.kernels.fp8_dequant import dequantize

def weights(gen):
    # normal values, subnormals (|w| < 2^-6), the extremes ±448, zeros and -0
    rows = [torch.randn(37, 53, generator=gen) * 60,
            torch.randn(64, 3, 3, 3, generator=gen) * 0.01,
            torch.randn(1, 5000, generator=gen)]
    w = rows[0]
    w[0, :4] = torch.tensor([448.0, -448.0, 0.0, -0.0])
    w[1, :3] = torch.tensor([2.0 ** -9, -(2.0 ** -8), 3 * 2.0 ** -9])
    return [t.clamp(-448, 448).to(torch.float8_e4m3fn) for t in rows]

gen = torch.Generator().manual_seed(0)
results = []
for w8 in weights(gen):
    scale = torch.rand(w8.shape[0], *([1] * (w8.dim() - 1)), generator=gen) * 0.03 + 1e-5
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for s in (None, scale):
            ref = w8.to(dtype) if s is None else w8.to(dtype).mul_(s.to(dtype))
            out = dequantize(w8, s, dtype)
            results.append({"shape": list(w8.shape), "dtype": str(dtype), "scaled": s is not None,
                            "equal": bool(torch.equal(out, ref)) and out.dtype == dtype,
                            "differing": int((out != ref).sum())})
print(json.dumps(results))
"""
# started when the tests are collected (tests/helpers/triton_interpreter.py)
INTERPRETER_CASES = ("-c", CASES)


def test_kernel_equals_the_torch_upcast_bit_for_bit():
    results = run_json(*INTERPRETER_CASES)
    assert len(results) == 3 * 3 * 2
    bad = [r for r in results if not r["equal"]]
    assert not bad, bad


def test_the_torch_path_is_taken_off_the_gpu_and_when_switched_off(monkeypatch):
    w8 = (torch.randn(8, 16) * 10).to(torch.float8_e4m3fn)
    scale = torch.rand(8, 1) + 0.5
    assert not fp8_dequant.usable(w8, scale, torch.bfloat16)  # a CPU tensor
    out = fp8.dequantize(w8, scale, torch.bfloat16)
    assert torch.equal(out, w8.to(torch.bfloat16).mul_(scale.to(torch.bfloat16)))
    monkeypatch.setenv(fp8_dequant.ENV, "off")
    assert not enabled(fp8_dequant.ENV)
    monkeypatch.setenv(fp8_dequant.ENV, "on")
    assert enabled(fp8_dequant.ENV) is HAS_TRITON
