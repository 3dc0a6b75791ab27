"""GPU benchmark: the Anima kernels (library/anima/kernels) against the torch path at the real shapes.

RoPE on a query and a key (B 2, 16 heads, 4096 tokens = 1024² latents, head_dim 128, strided as Attention
makes them, the real 3D table), alone and followed by the attention; the gated residual x + gate·out at
(2, 4096, 2048). Each is timed forward and forward+backward with CUDA events (median of --iters after
--warmup calls); the torch path is the one ANIMA_KERNELS=off gives, with the table cast once per attention
as before the kernels. Before timing, every result and grad is compared bit for bit (gate's grad: the
differing count and the largest gap in units of its fp32-reordering bound, see
library/anima/kernels/residual.py). One training step with gradient checkpointing runs each forward twice
and each backward once in all 28 blocks: `step_ms` is that total. Prints one JSON line per item.

    python bench/bench_anima_kernels.py [--iters 50] [--dtype bf16|fp16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_timing import median_us  # noqa: E402

from library.anima import layers  # noqa: E402
from library.anima.kernels import common  # noqa: E402
from library.anima.model import AnimaConfig, VideoRopePosition3DEmb  # noqa: E402

BLOCKS = 28


def path(on: bool) -> None:
    os.environ[common.ENV] = "on" if on else "off"


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


def rope_inputs(dtype: torch.dtype, dev: torch.device) -> dict:
    cfg = AnimaConfig()
    pos = VideoRopePosition3DEmb(cfg.head_dim, 128, 256, 256, 4.0, 4.0, 1.0).to(dev)
    cos, sin = pos(1, 64, 64, dev)  # 1024² pixels = 128² latents = 64² patches
    b, n, h, hd = 2, cos.shape[0], cfg.num_heads, cfg.head_dim
    q, k, v = (torch.randn(b, n, h, hd, device=dev).to(dtype).transpose(1, 2) for _ in range(3))
    return {"q": q, "k": k, "v": v, "cos": cos, "sin": sin, "g": torch.randn_like(q)}


def rope_step(t: dict, on: bool, attention: bool, backward: bool) -> list[torch.Tensor]:
    """One self-attention's RoPE (q and k), optionally with the attention after it, optionally with grads.
    The torch path casts the table once, as Attention did before the kernels."""
    path(on)
    q, k, v = (t[n].detach().requires_grad_(backward) for n in "qkv")
    cos, sin = (t["cos"], t["sin"]) if on else (t["cos"].to(q.dtype), t["sin"].to(q.dtype))
    qr, kr = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
    outs = [F.scaled_dot_product_attention(qr, kr, v)] if attention else [qr, kr]
    if backward:
        torch.autograd.backward(outs, [t["g"]] * len(outs))
        return outs + [q.grad, k.grad]
    return outs


def residual_inputs(dtype: torch.dtype, dev: torch.device) -> dict:
    b, n, d = 2, 4096, 2048
    x, out, g = (torch.randn(b, n, d, device=dev).to(dtype) for _ in range(3))
    gate = torch.randn(b, 3 * d, device=dev).to(dtype)[:, None, d : 2 * d]  # a chunk, as in Block
    return {"x": x, "out": out, "gate": gate, "g": g}


def residual_step(t: dict, on: bool, backward: bool) -> list[torch.Tensor]:
    path(on)
    x, gate, out = (t[n].detach().requires_grad_(backward) for n in ("x", "gate", "out"))
    y = layers.gated_residual(x, gate, out)
    if backward:
        y.backward(t["g"])
        return [y, x.grad, out.grad, gate.grad]
    return [y]


def gate_check(t: dict, kernel: torch.Tensor, reference: torch.Tensor) -> dict:
    """Differing elements of gate's grad and the largest gap over its bound (≤ 1 expected)."""
    n = t["x"].shape[1] - 1
    gamma = n * 2.0**-24 / (1 - n * 2.0**-24)
    u = 2.0**-8 if kernel.dtype == torch.bfloat16 else 2.0**-11
    s = (t["g"] * t["out"]).double().abs().sum(1, keepdim=True)
    tol = 2 * gamma * s + u / (1 - u) * (kernel.double().abs() + reference.double().abs())
    gap = ((kernel.double() - reference.double()).abs() / tol).max().item()
    return {
        "gate_grad_differing": int((kernel != reference).sum()),
        "gate_grad_gap_over_bound": round(gap, 4),
    }


def report(
    item: str, fwd: tuple[float, float], fwd_bwd: tuple[float, float], calls: int, extra: dict
) -> None:
    # per step: each call's forward twice (the checkpoint's recompute) and its backward once
    step = [calls * (f + fb) / 1000 for f, fb in zip(fwd, fwd_bwd)]
    print(json.dumps({"item": item, "torch_fwd_us": round(fwd[1], 1), "kernel_fwd_us": round(fwd[0], 1),
                      "torch_fwd_bwd_us": round(fwd_bwd[1], 1), "kernel_fwd_bwd_us": round(fwd_bwd[0], 1),
                      "calls_per_step": calls, "torch_step_ms": round(step[1], 2),
                      "kernel_step_ms": round(step[0], 2), **extra, "gpu": torch.cuda.get_device_name()}),
          flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    if not torch.cuda.is_available() or common.triton is None or common.interpreting():
        raise SystemExit("bench_anima_kernels: needs a CUDA device and Triton (and no TRITON_INTERPRET)")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    t = rope_inputs(dtype, dev)
    for attention in (False, True):
        outs = [rope_step(t, on, attention, backward=True) for on in (True, False)]
        # with the attention only its output: flash attention's backward is not deterministic
        same = all(same_bits(a, b) for a, b in zip(*(o[:1] if attention else o for o in outs)))
        if not same:
            raise SystemExit("bench_anima_kernels: the RoPE kernel differs from the torch path (a bug)")
        times = [[median_us(lambda on=on, bw=bw, at=attention: rope_step(t, on, at, bw), args.iters, args.warmup)
                  for on in (True, False)] for bw in (False, True)]  # fmt: skip
        item = "rope_q_k+attention" if attention else "rope_q_k"
        report(
            f"{item} {args.dtype}", times[0], times[1], BLOCKS, {"bitwise": "output" if attention else "all"}
        )
    t = residual_inputs(dtype, dev)
    (yk, xk, ok, gk), (yt, xt, ot, gt) = (residual_step(t, on, backward=True) for on in (True, False))
    same = same_bits(yk, yt) and same_bits(xk, xt) and same_bits(ok, ot)
    if not same:
        raise SystemExit("bench_anima_kernels: the gated residual kernel differs from the torch path (a bug)")
    times = [[median_us(lambda on=on, bw=bw: residual_step(t, on, bw), args.iters, args.warmup)
              for on in (True, False)] for bw in (False, True)]  # fmt: skip
    report(f"gated_residual {args.dtype}", times[0], times[1], 3 * BLOCKS,
           {"bitwise_y_x_out": same, **gate_check(t, gk, gt)})  # fmt: skip


if __name__ == "__main__":
    main()
