"""Single-layer microbench: one adapted Linear, forward + backward (incl. the base GEMM and grad x).

Times the standalone functions (spec networks.md §6); the path choice of `networks.functional.dispatch` is
calibrated against the modules themselves by bench/bench_paths.py. Each row is
one (size, variant): eager ms/iter, CUDA-graph replay ms/iter (no launch overhead: the graph-mode cost),
and the extra peak memory over the base layer. Params are fp32, activations bf16 under autocast, as in
training.

GPU:  python bench/bench_layers.py --out layers.json
CPU smoke: python bench/bench_layers.py --device cpu --sizes 64x48x32 --iters 2 --no_graph
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_timing import capture  # noqa: E402

from networks.functional import (  # noqa: E402
    HadaWeight,
    factorization,
    loha_khatri_rao_linear,
    lokr_bypass_linear,
    lokr_delta_weight,
)
from networks.functional.dispatch import (  # noqa: E402
    loha_linear_costs,
    lokr_linear_costs,
)

# spec §6 sizes: (O, I, N tokens)
SPEC_SIZES = "1280x1280x4096,10240x1280x4096,640x640x16384,2048x2048x16384,8192x2048x16384,2048x8192x16384"


def _parse_sizes(text: str) -> list[tuple[int, int, int]]:
    out = []
    for tok in text.split(","):
        o, i, n = (int(v) for v in tok.lower().split("x"))
        out.append((o, i, n))
    return out


def _param(*shape: int, device: torch.device, std: float = 0.05) -> torch.Tensor:
    return (torch.randn(*shape, device=device) * std).requires_grad_(True)


def make_variants(o: int, i: int, device: torch.device) -> dict[str, tuple[Callable, list[torch.Tensor]]]:
    """name -> (delta(x) function, its trainable params)."""
    v: dict[str, tuple[Callable, list[torch.Tensor]]] = {}
    v["base"] = (lambda x: None, [])
    down, up = _param(32, i, device=device), _param(o, 32, device=device)
    v["lora_r32"] = (lambda x: F.linear(F.linear(x, down), up * 0.5), [down, up])
    for f in (-1, 8):
        a, b = factorization(o, f)
        c, d = factorization(i, f)
        w1, w2 = _param(a, c, device=device), _param(b, d, device=device)
        tag = f"lokr_f{f}_full"
        v[tag + "_rebuild"] = (
            lambda x, w1=w1, w2=w2: F.linear(
                x, lokr_delta_weight(w1, None, None, w2, None, None, None, 1.0, (o, i))
            ),
            [w1, w2],
        )
        v[tag + "_bypass"] = (lambda x, w1=w1, w2=w2: lokr_bypass_linear(x, w1, w2, 1.0), [w1, w2])
        if f == 8 and 32 < max(b, d) / 2:  # low-rank W2 at r32 (the f8 default layout)
            w1l, w2a, w2b = (
                _param(a, c, device=device),
                _param(b, 32, device=device),
                _param(32, d, device=device),
            )
            v["lokr_f8_r32_rebuild"] = (
                lambda x, w1=w1l, w2a=w2a, w2b=w2b: F.linear(
                    x, lokr_delta_weight(w1, None, None, None, w2a, w2b, None, 0.5, (o, i))
                ),
                [w1l, w2a, w2b],
            )
            v["lokr_f8_r32_bypass"] = (
                lambda x, w1=w1l, w2a=w2a, w2b=w2b: lokr_bypass_linear(
                    x, w1, w2a @ w2b, 0.5
                ),  # as LoKrModule
                [w1l, w2a, w2b],
            )
    for r in (8, 32):
        fa = [_param(o, r, device=device), _param(r, i, device=device), _param(o, r, device=device)]
        fa.append(_param(r, i, device=device))
        w1a, w1b, w2a, w2b = fa
        v[f"loha_r{r}_custom"] = (
            lambda x, w1a=w1a, w1b=w1b, w2a=w2a, w2b=w2b: F.linear(
                x, HadaWeight.apply(w1a, w1b, w2a, w2b, 0.5)
            ),
            fa,
        )
        v[f"loha_r{r}_plain"] = (
            lambda x, w1a=w1a, w1b=w1b, w2a=w2a, w2b=w2b: F.linear(x, ((w1a * 0.5) @ w1b) * (w2a @ w2b)),
            fa,
        )
        v[f"loha_r{r}_kr"] = (
            lambda x, w1a=w1a, w1b=w1b, w2a=w2a, w2b=w2b: loha_khatri_rao_linear(x, w1a, w1b, w2a, w2b, 0.5),
            fa,
        )
    return v


def _time_eager(step: Callable[[], None], iters: int, device: torch.device, repeats: int = 1) -> float:
    """ms per call of step (synchronised wall time), the fastest of `repeats` timed loops."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        step()
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        sync()
        best = min(best, (time.perf_counter() - t0) / iters)
    return best * 1e3


def _time_graph(step: Callable[[], None], iters: int, repeats: int = 1) -> float:
    """ms per replay of step captured as one CUDA graph (warmed up on a side stream first)."""
    g = capture(step)
    g.replay()
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            g.replay()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / iters)
    return best * 1e3


def bench_size(o: int, i: int, n: int, args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    w = torch.randn(o, i, device=device, dtype=dtype) * 0.02
    x = torch.randn(n, i, device=device, dtype=dtype).requires_grad_(True)
    gy = torch.randn(n, o, device=device, dtype=dtype)
    rows = []
    base_peak = None
    for name, (fn, params) in make_variants(o, i, device).items():

        def step(fn=fn, params=params) -> None:
            with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                y = F.linear(x, w)
                d = fn(x)
                if d is not None:
                    y = y + d.to(y.dtype)
            y.backward(gy)

        row: dict = {"O": o, "I": i, "N": n, "variant": name}
        try:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            row["eager_ms"] = round(_time_eager(step, args.iters, device), 4)
            if device.type == "cuda":
                peak = (torch.cuda.max_memory_allocated() - before) / 2**20
                base_peak = peak if name == "base" else base_peak
                row["extra_peak_mib"] = round(peak - (base_peak or 0.0), 1)
                if not args.no_graph:
                    x.grad = None
                    for p in params:
                        p.grad = None
                    row["graph_ms"] = round(_time_graph(step, args.iters), 4)
        except Exception as e:  # one failing variant must not lose the rest of the table
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        x.grad = None
        for p in params:
            p.grad = None
        rows.append(row)
        print(json.dumps(row), flush=True)
    # the cost model's predictions next to the measurements, for calibration
    a, b = factorization(o, -1)
    c, d = factorization(i, -1)
    pred = {
        "O": o,
        "I": i,
        "N": n,
        "model_lokr_f-1": lokr_linear_costs(n, a, b, c, d),
        "model_loha_r8": loha_linear_costs(n, o, i, 8),
        "model_loha_r32": loha_linear_costs(n, o, i, 32),
    }
    print(json.dumps(pred), flush=True)
    rows.append(pred)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--sizes", default=SPEC_SIZES, help="OxIxN,... (out, in, tokens)")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--no_graph", action="store_true", help="skip the CUDA-graph replay timing")
    p.add_argument("--out", default=None, help="write all rows as JSON here")
    args = p.parse_args(argv)
    rows = []
    for o, i, n in _parse_sizes(args.sizes):
        rows.extend(bench_size(o, i, n, args))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
