"""Host work of one whole training step (forward with gradient checkpointing, loss, backward), ours against
sd-scripts', on the meta device: the SDXL U-Net at its real config, with and without adapters.

Why the meta device: an eager SDXL step on the GPU machine is host-bound (the GPU waits on Python, the
dispatcher and autograd), and on meta every op does all of that host work and no arithmetic. So the wall
time of a meta step is the host's share of an eager step, with nothing of the GPU's in it; what it leaves
out is the CUDA launch itself (a few µs per kernel), autocast's casts and the fp8 base (torch has no
autocast on meta; both models run in fp32 here). The op count is exact and machine-independent: every
ATen op the step dispatches (forward, recompute and backward), split into ops that launch a kernel on a
GPU and views/metadata ops that do not.

Each variant runs in its own process (ours and sd-scripts' both have a `networks` package). The processes
run round-robin, `--rounds` times, so drift on a shared host hits every variant alike; a row's `median_s`
is the median over all its timed steps.

    python3 bench/bench_host_step.py --sd_scripts_path baselines/sd-scripts \\
        --variants floor,ours-lokr,ours-loha,sd-floor,sd-lokr,sd-loha

Variants are bench_train_step.py's (floor, ours-*, sd-floor, sd-*, with per-variant network args after
colons). sd-* variants need `--sd_scripts_path`; the torchvision stand-in under bench/e2e_shim lets its
`library.utils` import without torchvision.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="floor,ours-lora,ours-loha,ours-lokr")
    p.add_argument("--sd_scripts_path", default=None)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--network_args", nargs="*", default=[])
    p.add_argument("--steps", type=int, default=3, help="timed steps per round (after one untimed)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no_gradient_checkpointing", action="store_true")
    p.add_argument("--tiny", action="store_true", help="tiny SDXL config (CPU smoke runs)")
    p.add_argument("--variant_timeout", type=float, default=600.0)
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# not views by torch's flag, but no kernel on a GPU either: allocation and metadata
_NO_KERNEL = {
    "_unsafe_view",
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "detach",
    "alias",
    "lift_fresh",
}


class _OpCounter:
    """Counts the ATen ops dispatched inside it (kernels vs views), by name."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                kind = "views" if func.is_view or name in _NO_KERNEL else "kernels"
                counter.counts[kind] += 1
                if kind == "kernels":
                    counter.by_name[name] += 1
                return func(*args, **(kwargs or {}))

        self.mode = _Mode()
        self.counts: collections.Counter = collections.Counter()
        self.by_name: collections.Counter = collections.Counter()


def run_single(args: argparse.Namespace) -> dict:
    import bench_train_step as bts
    import torch

    v = bts._parse_variant(args.single, args.network_args)
    args.device, args.dtype = "meta", "fp32"
    device, dtype = torch.device("meta"), torch.float32
    unet, call, ctx_dim, pooled_dim = bts._build_model(args, v, device, dtype)
    network, params, n_modules = bts._build_network(args, v, unet, device)
    inputs = bts._make_inputs(args, False, ctx_dim, pooled_dim, device, dtype)
    if not params:  # the floor: a backward through the frozen model needs something that takes a grad
        inputs.x0.requires_grad_(True)

    def step():
        pred = call(unet, *inputs.model_args())
        torch.nn.functional.mse_loss(pred, inputs.noise).backward()
        for prm in params:
            prm.grad = None
        inputs.x0.grad = None

    step()  # first call: lazy set-up (path choices, caches) stays out of the counts and times
    counter = _OpCounter()
    with counter.mode:
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {
        "variant": v.name,
        "times_s": times,
        "kernel_ops": counter.counts["kernels"],
        "view_ops": counter.counts["views"],
        "top_ops": counter.by_name.most_common(12),
        "modules": n_modules,
        "trainable_tensors": len(params),
    }


def _child(args: argparse.Namespace, argv: list[str], variant: str) -> dict:
    import bench_train_step as bts

    env = dict(os.environ)
    if variant.startswith("sd"):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE / "e2e_shim"), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--single", variant]
    return bts.run_child(variant, cmd, args.variant_timeout, env)


def main(argv: list[str] | None = None) -> list[dict]:
    argv = list(argv if argv is not None else sys.argv[1:])
    args = parse_args(argv)
    sys.path.insert(0, str(HERE))
    if args.single:
        print("BENCH " + json.dumps(run_single(args)), flush=True)
        return []
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    rows: dict[str, dict] = {}
    for _ in range(args.rounds):
        for variant in variants:
            r = _child(args, argv, variant)
            row = rows.setdefault(variant, {**r, "times_s": []})
            if "error" in r:
                row["error"] = r["error"]
            row["times_s"] += r.get("times_s", [])
    results = []
    for variant in variants:
        row = rows[variant]
        if row["times_s"]:
            row["median_s"] = round(statistics.median(row["times_s"]), 4)
        row["times_s"] = [round(t, 4) for t in row["times_s"]]
        results.append(row)
        print(json.dumps(row), flush=True)
    print(
        "SUMMARY "
        + json.dumps([{k: r.get(k) for k in ("variant", "median_s", "kernel_ops")} for r in results])
    )
    return results


if __name__ == "__main__":
    main()
