"""Host cost of an adapted layer in eager mode: a chain of small Linear layers, forward + backward.

In an eager SDXL step the GPU mostly waits for the host (issue 7: 20–43 % busy), so what an adapter costs is
mostly host time: Python, autograd nodes, dispatch and launches per layer. With small layers and few tokens
the GPU work is negligible and the wall time per step is host time. Each row: µs per layer per
forward + backward, and that minus the bare chain's (the adapter's own cost), for the same chain with
each way of adding the branch. bf16 autocast with fp32 factors, as in training.

GPU:  python bench/bench_host_overhead.py [--sd_scripts_path baselines/sd-scripts]
CPU smoke: python bench/bench_host_overhead.py --device cpu --layers 4 --iters 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]


class PlainLoRA(nn.Module):
    """LoRA written with built-in autograd ops only (no custom Function), for comparison."""

    def __init__(self, base: nn.Linear, rank: int, scale: float) -> None:
        super().__init__()
        self.base = [base]
        self.down = nn.Parameter(torch.randn(rank, base.in_features, device=base.weight.device) * 0.01)
        self.up = nn.Parameter(torch.randn(base.out_features, rank, device=base.weight.device) * 0.01)
        self.scale = scale
        self.orig = base.forward
        base.forward = self.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.orig(x) + F.linear(F.linear(x, self.down), self.up) * self.scale


def _ours(algo: str, rank: int, alpha: float) -> Callable[[nn.Linear, int], list[nn.Parameter]]:
    sys.path.insert(0, str(REPO_ROOT))
    from networks.loha import LoHaModule
    from networks.lokr import LoKrModule
    from networks.lora import LoRAModule
    from networks.modules.adapter import attach_adapter
    from networks.network_args import NetworkArgs

    def attach(lin: nn.Linear, i: int) -> list[nn.Parameter]:
        if algo == "lora":
            m = LoRAModule(f"l{i}", lin, 1.0, rank, alpha)
        elif algo == "loha":
            m = LoHaModule(f"l{i}", lin, 1.0, rank, alpha)
        else:
            m = LoKrModule.create(f"l{i}", lin, 1.0, rank, alpha, NetworkArgs(algo="lokr"))
        with torch.no_grad():  # a nonzero branch, as after a few steps
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        attach_adapter(lin, m)
        m.train()
        return list(m.parameters())

    return attach


def _sd_scripts(
    path: str, algo: str, rank: int, alpha: float
) -> Callable[[nn.Linear, int], list[nn.Parameter]]:
    sys.path.insert(0, path)  # its own `networks` and `library` packages (this process imports none of ours)
    mod = __import__(f"networks.{algo}", fromlist=["x"])
    cls = {"lora": "LoRAModule", "loha": "LoHaModule", "lokr": "LoKrModule"}[algo]

    def attach(lin: nn.Linear, i: int) -> list[nn.Parameter]:
        m = getattr(mod, cls)(f"lora_unet_l{i}", lin, 1.0, rank, alpha).to(lin.weight.device)
        m.apply_to()
        m.train()
        return [p for p in m.parameters() if p.requires_grad]

    return attach


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    autocast = device.type == "cuda"
    dtype = torch.bfloat16 if autocast else torch.float32
    variants: dict[str, Callable | None] = {"base": None}
    if args.family == "sd":
        for algo in ("lora", "loha", "lokr"):
            variants[f"sd-{algo}"] = _sd_scripts(args.sd_scripts_path, algo, args.rank, args.alpha)
    else:
        for algo in ("lora", "loha", "lokr"):
            variants[f"ours-{algo}"] = _ours(algo, args.rank, args.alpha)
        variants["plain-lora"] = lambda lin, i: list(
            PlainLoRA(lin, args.rank, args.alpha / args.rank).parameters()
        )
    rows = []
    base_us = None
    for name, attach in variants.items():
        torch.manual_seed(0)
        chain = nn.Sequential(*[nn.Linear(args.dim, args.dim) for _ in range(args.layers)]).to(device, dtype)
        chain.requires_grad_(False)
        params: list[nn.Parameter] = []
        if attach is not None:
            for i, lin in enumerate(chain):
                params += attach(lin, i)
        x = torch.randn(args.tokens, args.dim, device=device, dtype=dtype, requires_grad=True)

        def step(chain=chain, x=x, params=params) -> None:
            with torch.autocast(device.type, dtype=dtype, enabled=autocast):
                y = chain(x)
            y.float().sum().backward()
            x.grad = None
            for p in params:
                p.grad = None

        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        for _ in range(5):
            step()
        sync()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for _ in range(args.iters):
                step()
            sync()
            times.append((time.perf_counter() - t0) / args.iters / args.layers * 1e6)
        us = min(times)
        base_us = us if name == "base" else base_us
        row = {
            "variant": name if args.family == "ours" else f"{name} ({args.family})",
            "us_per_layer": round(us, 2),
            "extra_us": round(us - (base_us or 0.0), 2),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=100)
    p.add_argument("--dim", type=int, default=320)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5, help="timed repeats; the fastest counts (host noise)")
    p.add_argument("--sd_scripts_path", default=None, help="kohya-ss/sd-scripts checkout: adds its modules")
    p.add_argument("--family", default="ours", choices=["ours", "sd"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    rows = run(args)
    if args.sd_scripts_path and args.family == "ours":  # its `networks` package would clash with ours
        argv = [a for a in (argv if argv is not None else sys.argv[1:])]
        proc = subprocess.run(
            [sys.executable, __file__, *argv, "--family", "sd"], capture_output=True, text=True
        )
        out = proc.stdout
        if proc.returncode:
            err = proc.stderr.strip().splitlines()[-1:] or ["no output"]
            out += json.dumps({"variant": "sd-*", "error": err[0][:300]}) + "\n"
        print(out, end="", flush=True)
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return rows


if __name__ == "__main__":
    main()
