"""GPU benchmark: LoHa's ΔW build and factor grads, torch's path against the Triton kernels
(networks/kernels/loha_delta.py), at the O×I of every adapted Linear of SDXL and Anima, r = 32, bf16.

Each call is captured in a CUDA graph (the trainer's step mode) and its replay timed between CUDA events
after a 256 MB write that evicts the L2 (in the step, ΔW and grad ΔW come from other layers' work), median
of --iters. Errors are max |out − ref| / max |ref| against fp64 from
the same bf16 inputs, for both paths. One training step builds ΔW twice (forward and the checkpoint's
recompute) and forms the grads once, so the per-model total weights each shape by its layer count times
(2·build + grads). With --sweep, the kernels also run a few other tilings per shape and report the fastest.

    python bench/bench_loha_delta.py [--iters 30] [--sweep] [--out PATH]
    TRITON_INTERPRET=1 python bench/bench_loha_delta.py --smoke     (CPU: one small shape, errors only)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_timing import capture  # noqa: E402

from networks.functional.loha import hada_delta, hada_grads  # noqa: E402
from networks.kernels import loha_delta  # noqa: E402
from networks.kernels.triton_common import interpreting, switched_off  # noqa: E402

# name: (O, I, adapted Linears of this shape in one model). SDXL: transformer blocks at width 640 (10) and
# 1280 (60): attention q/k/v/out and proj_in/out square, GEGLU ff C → 8C and 4C → C, attn2 k/v from the
# 2048-wide text. Anima: 28 blocks of width 2048, mlp 8192, cross-attention k/v from 1024-wide text.
SHAPES = {
    "sdxl_attn640": (640, 640, 70),
    "sdxl_ff640_proj": (5120, 640, 10),
    "sdxl_ff640_out": (640, 2560, 10),
    "sdxl_kv640": (640, 2048, 20),
    "sdxl_attn1280": (1280, 1280, 372),
    "sdxl_ff1280_proj": (10240, 1280, 60),
    "sdxl_ff1280_out": (1280, 5120, 60),
    "sdxl_kv1280": (1280, 2048, 120),
    "anima_attn": (2048, 2048, 168),
    "anima_mlp1": (8192, 2048, 28),
    "anima_mlp2": (2048, 8192, 28),
    "anima_kv": (2048, 1024, 56),
}
T = loha_delta.Tiles
BUILD_SWEEP = [T(64, 128, 1, 4), T(64, 64, 1, 4), T(128, 64, 1, 4), T(128, 128, 1, 8)]
GRADS_SWEEP = [T(64, 64, c, 4) for c in (1, 2, 4)] + [T(128, 64, c, 8) for c in (1, 2, 4)]
GRADS_SWEEP += [T(128, 128, c, 8) for c in (1, 2)] + [T(64, 64, 2, 4, False), T(128, 64, 2, 8, False)]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names from the table")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--iters", type=int, default=30, help="timed calls per variant")
    p.add_argument("--sweep", action="store_true", help="also time the other tilings and report the fastest")
    p.add_argument("--smoke", action="store_true", help="one small shape, errors only (TRITON_INTERPRET=1)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON lines here")
    return p.parse_args(argv)


class ColdTimer:
    """Median µs of a call replayed from a CUDA graph (as the trainer's graph mode runs it: no host time
    between its launches), timed between CUDA events, the L2 evicted before each."""

    def __init__(self, iters: int) -> None:
        self.iters = iters
        self.flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")

    def __call__(self, fn) -> float:
        graph = capture(fn)
        times = []
        for _ in range(self.iters):
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1000)
        del graph
        return statistics.median(times)


def _rel_err(outs, refs) -> float:
    """Worst over the outputs of max |out − ref| / max |ref|."""
    return max(((o.double() - r).abs().max() / r.abs().max()).item() for o, r in zip(outs, refs))


def _inputs(o: int, i: int, r: int, device: str):
    gen = torch.Generator(device=device).manual_seed(0)
    f = [torch.randn(s, device=device, generator=gen) * k for s, k in
         (((o, r), r**-0.5), ((r, i), 1.0), ((o, r), r**-0.5), ((r, i), 1.0))]  # fmt: skip
    f = [t.bfloat16() for t in f]
    grad = torch.randn(o, i, device=device, generator=gen).bfloat16()
    a1, b1, a2, b2 = (t.double() for t in f)
    p1, p2 = a1 @ b1, a2 @ b2
    g = grad.double()
    refs = [p1 * p2, (g * p2) @ b1.T, a1.T @ (g * p2), (g * p1) @ b2.T, a2.T @ (g * p1)]
    return f, grad, refs


def errors(o: int, i: int, r: int, device: str) -> dict:
    """Both paths' worst relative error against fp64, build and grads apart."""
    f, grad, refs = _inputs(o, i, r, device)
    need = [True] * 4
    kernel = [loha_delta.build(*f), *loha_delta.grads(grad, *f, need)]
    with switched_off(loha_delta.ENV):
        plain = [hada_delta(f), *hada_grads(grad, f, need)]
    parts = {"build": slice(0, 1), "grads": slice(1, 5)}
    return {f"err_{part}_{path}": _rel_err(outs[cut], refs[cut]) for part, cut in parts.items()
            for path, outs in (("torch", plain), ("kernel", kernel))}  # fmt: skip


def _fastest(timer: ColdTimer, fn, sweep: list) -> dict:
    times = {str(tuple(t)): timer(lambda t=t: fn(t)) for t in sweep}
    best = min(times, key=times.get)
    return {"tiles": best, "us": times[best]}


def time_shape(name: str, r: int, timer: ColdTimer, sweep: bool) -> dict:
    o, i, layers = SHAPES[name]
    f, grad, _ = _inputs(o, i, r, "cuda")
    need = [True] * 4
    row = {"shape": name, "O": o, "I": i, "r": r, "layers": layers, **errors(o, i, r, "cuda")}
    with switched_off(loha_delta.ENV):  # read while the calls are captured
        row["build_torch_us"] = timer(lambda: hada_delta(f))
        row["grads_torch_us"] = timer(lambda: hada_grads(grad, f, need))
    row["build_kernel_us"] = timer(lambda: loha_delta.build(*f))
    row["grads_kernel_us"] = timer(lambda: loha_delta.grads(grad, *f, need))
    row["tiles_build"] = str(tuple(loha_delta.build_tiles(o, i, grad.device)))
    row["tiles_grads"] = str(tuple(loha_delta.grads_tiles(o, i, grad.device)))
    if sweep:
        row["build_best"] = _fastest(timer, lambda t: loha_delta.build(*f, tiles=t), BUILD_SWEEP)
        row["grads_best"] = _fastest(timer, lambda t: loha_delta.grads(grad, *f, need, tiles=t), GRADS_SWEEP)
    return row


def totals(rows: list[dict]) -> list[dict]:
    """Per model: Σ layers·(2·build + grads) in ms, torch and kernel."""
    out = []
    for model in sorted({row["shape"].split("_")[0] for row in rows}):
        mine = [row for row in rows if row["shape"].startswith(model + "_")]
        step = {
            path: sum(r["layers"] * (2 * r[f"build_{path}_us"] + r[f"grads_{path}_us"]) for r in mine) / 1000
            for path in ("torch", "kernel")
        }
        out.append({"model": model, "shapes": len(mine), "layers": sum(r["layers"] for r in mine),
                    "step_torch_ms": step["torch"], "step_kernel_ms": step["kernel"]})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.smoke:
        if not interpreting() or loha_delta.triton is None:
            raise SystemExit("bench_loha_delta: --smoke runs under TRITON_INTERPRET=1 with Triton installed")
        lines = [{"shape": "smoke_77x130", "r": 8, **errors(77, 130, 8, "cpu")}]
    else:
        if not torch.cuda.is_available() or loha_delta.triton is None or interpreting():
            raise SystemExit("bench_loha_delta: needs a CUDA device and Triton (without TRITON_INTERPRET)")
        unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
        if unknown:
            raise SystemExit(f"bench_loha_delta: --shapes {','.join(unknown)} not in {', '.join(SHAPES)}")
        timer = ColdTimer(args.iters)
        lines = [time_shape(name, args.rank, timer, args.sweep) for name in args.shapes.split(",")]
        lines += totals(lines)
    text = "".join(json.dumps(line) + "\n" for line in lines)
    print(text, end="")
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
