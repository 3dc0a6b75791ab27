"""GPU benchmark: adaLN's modulated LayerNorm at the Anima DiT's real shape, autocast's torch path against
the Triton kernel (library/anima/kernels/modulated_norm.py).

The torch path is what Block runs without the kernel under CUDA autocast: LayerNorm (an fp32 autocast op,
so x is cast to fp32), modulate (fp32 addcmul), one bf16 cast per consuming linear; backward gets one bf16
grad per consumer. n = 3 is self-attention's q/k/v, n = 1 cross-attention's q, the MLP and the final layer.
Each is timed with CUDA events (median of --iters after a warm-up), forward alone and forward + backward,
with the memory the forward keeps for backward. The differences between the two paths' outputs and grads
are printed with them (max |diff|, in units of the bf16 ulp, the fraction of elements that differ).
One JSON line per n, then a per-step estimate (28 blocks, gradient checkpointing: two forwards and one
backward per call). Runs in well under a minute on an H100.

    python bench/bench_anima_modnorm.py [--iters 50]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_timing import median_us  # noqa: E402

from library.anima.kernels import modulated_norm  # noqa: E402
from library.anima.model import modulate, modulated_norm_inputs  # noqa: E402

DTYPE = torch.bfloat16


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    """max |a - b|, the largest difference in bf16 ulps of the larger magnitude, the fraction that differs."""
    diff = (a.float() - b.float()).abs()
    mag = torch.maximum(a.float().abs(), b.float().abs())
    _, exp = torch.frexp(mag)
    ulp = torch.ldexp(torch.ones_like(mag), exp - 8)  # bf16: 8 significand bits
    return {
        "max_abs": float(diff.max()),
        "max_ulps": float((diff / ulp).max()),
        "frac_differing": float((diff > 0).float().mean()),
    }


def bench_n(n: int, shape: tuple[int, int, int], iters: int) -> dict:
    b, seq, d = shape
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(n)

    def rnd(*s, scale=1.0, offset=0.0):
        return (torch.randn(*s, device=dev, generator=gen) * scale + offset).to(DTYPE)

    x, scale, shift = rnd(b, seq, d, scale=3.0, offset=1.5), rnd(b, 1, d, scale=0.7), rnd(b, 1, d)
    grads = [rnd(b, seq, d) for _ in range(n)]
    leaves = [t.clone().requires_grad_() for t in (x, scale, shift)]
    norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6).to(dev)

    def torch_forward():
        with torch.autocast("cuda", dtype=DTYPE):
            h = modulate(norm(leaves[0]), leaves[1], leaves[2])
            return [h.to(DTYPE) for _ in range(n)]  # each consuming linear's autocast cast

    def kernel_forward():
        with torch.autocast("cuda", dtype=DTYPE):
            assert modulated_norm.usable(leaves[0], leaves[1], leaves[2], norm)
            return list(modulated_norm_inputs(norm, leaves[0], leaves[1], leaves[2], n))

    row: dict = {"n": n, "shape": list(shape), "dtype": "bf16"}
    results = {}
    for name, forward in (("torch", torch_forward), ("kernel", kernel_forward)):

        def step(forward=forward):
            for t in leaves:
                t.grad = None
            torch.autograd.backward(forward(), grads)

        row[f"fwd_ms_{name}"] = round(median_us(forward, iters) / 1000, 4)
        row[f"fwd_bwd_ms_{name}"] = round(median_us(step, iters) / 1000, 4)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        ys = forward()
        row[f"saved_MiB_{name}"] = round((torch.cuda.memory_allocated() - before) / 2**20, 1)
        del ys
        step()
        results[name] = [forward()[0].detach(), *(t.grad.clone() for t in leaves)]
    row["speedup_fwd"] = round(row["fwd_ms_torch"] / row["fwd_ms_kernel"], 2)
    row["speedup_fwd_bwd"] = round(row["fwd_bwd_ms_torch"] / row["fwd_bwd_ms_kernel"], 2)
    for name, a, c in zip(("y", "grad_x", "grad_scale", "grad_shift"), results["kernel"], results["torch"]):
        row[f"diff_{name}"] = compare(a, c)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per image (1024², patch 2)")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--blocks", type=int, default=28)
    args = ap.parse_args()
    if not torch.cuda.is_available() or modulated_norm.triton is None:
        raise SystemExit("bench_anima_modnorm: needs a CUDA device and Triton")
    shape = (args.batch, args.tokens, args.dim)
    rows = {n: bench_n(n, shape, args.iters) for n in (3, 1)}
    for row in rows.values():
        print(json.dumps({**row, "gpu": torch.cuda.get_device_name()}), flush=True)

    # per block: one n = 3 call and two n = 1 calls, each run forward twice (checkpoint) and backward once
    def per_step(name: str) -> float:
        calls = [rows[3], rows[1], rows[1]]
        return args.blocks * sum(r[f"fwd_ms_{name}"] + r[f"fwd_bwd_ms_{name}"] for r in calls)

    est = {name: round(per_step(name), 2) for name in ("torch", "kernel")}
    print(json.dumps({"per_step_estimate_ms": est, "saved_ms": round(est["torch"] - est["kernel"], 2),
                      "blocks": args.blocks, "gpu": torch.cuda.get_device_name()}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
