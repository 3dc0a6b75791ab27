"""Host time of one bitsandbytes 8-bit optimizer step: its per-tensor loop against the flat update
(library/training/flat_8bit.py), for the trainable tensors of an SDXL LoHa or LoKr.

`--network loha`: the LoHa factors of every adapted Linear of the SDXL U-Net (722 layers × 4 factors =
2 888 tensors at rank `--rank`, shapes from bench_loha_delta.SHAPES). `--network lokr`: the trainable
tensors of the real LoKr network (`networks.lokr`, dim `--rank`, default factor) built on the SDXL U-Net
config on the meta device: 1 574 tensors at dim 32, 1 514 of them under bitsandbytes' default 8-bit
minimum, so with 32-bit states. `--tensors N` keeps N of them, evenly spread over the list so the size
mix stays. Both optimizers see the same grads every step (a grad set once, no backward: only the step is
timed). Each row: ms per step measured on the host clock, with the device synchronised after each step
(`wall_ms`) and without (`host_ms`: time until step() returns), median over `--steps`; after the timed
steps the two runs' params are compared bitwise.

GPU: python bench/bench_flat_8bit.py [--network lokr]
CPU: python bench/bench_flat_8bit.py --device cpu --rank 4 --min_8bit_size 1024 --tensors 722 --steps 5
CPU, LoKr: python bench/bench_flat_8bit.py --device cpu --network lokr --steps 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loha_delta import SHAPES  # noqa: E402

from library.training import flat_8bit  # noqa: E402


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--network", default="loha", choices=["loha", "lokr"])
    p.add_argument("--rank", type=int, default=32, help="LoHa rank / LoKr network_dim")
    p.add_argument("--tensors", type=int, default=0, help="keep this many tensors (0: all)")
    p.add_argument("--optimizer", default="AdamW8bit", choices=["AdamW8bit", "Lion8bit"])
    p.add_argument("--min_8bit_size", type=int, default=4096, help="bitsandbytes' 8-bit minimum")
    p.add_argument("--steps", type=int, default=20, help="timed steps (after 3 untimed)")
    return p.parse_args(argv)


def loha_shapes(rank: int) -> list[tuple[int, int]]:
    """The four factors of each SDXL LoHa layer, layer after layer: (O, r), (r, I), (O, r), (r, I)."""
    out: list[tuple[int, int]] = []
    for name, (o, i, count) in SHAPES.items():
        if name.startswith("sdxl"):
            out += [(o, rank), (rank, i), (o, rank), (rank, i)] * count
    return out


def lokr_shapes(dim: int) -> list[tuple[int, ...]]:
    """The trainable tensors of an SDXL LoKr (U-Net only, default factor), in the network's order."""
    from diffusers import UNet2DConditionModel

    from library.sdxl.config import SDXL_UNET_CONFIG
    from networks import lokr

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
        net = lokr.create_network(1.0, dim, dim, None, None, unet)
    return [tuple(p.shape) for p in net.parameters() if p.requires_grad]


def _keep(shapes: list[tuple[int, ...]], n: int) -> list[tuple[int, ...]]:
    if not n or n >= len(shapes):
        return shapes
    return [shapes[round(k * (len(shapes) - 1) / max(n - 1, 1))] for k in range(n)]


def _timed(opt: torch.optim.Optimizer, steps: int, device: torch.device) -> tuple[float, float]:
    """Median ms per step: until step() returns, and until the device has finished it too."""
    host, wall = [], []
    for i in range(steps + 3):
        t0 = time.perf_counter()
        opt.step()
        t1 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t2 = time.perf_counter()
        if i >= 3:
            host.append((t1 - t0) * 1e3)
            wall.append((t2 - t0) * 1e3)
    return statistics.median(host), statistics.median(wall)


def run(args: argparse.Namespace) -> dict:
    import bitsandbytes as bnb

    device = torch.device(args.device)
    shapes = _keep((lokr_shapes if args.network == "lokr" else loha_shapes)(args.rank), args.tensors)
    cls = getattr(bnb.optim, args.optimizer)
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) * 0.1 for s in shapes]
    grads = [torch.randn(s, generator=gen).to(device) for s in shapes]
    row: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "network": args.network, "optimizer": args.optimizer, "rank": args.rank, "tensors": len(shapes),
                 "elements": sum(t.numel() for t in init), "min_8bit_size": args.min_8bit_size,
                 "tensors_32bit": sum(t.numel() < args.min_8bit_size for t in init)}  # fmt: skip
    params = {}
    for kind, build in (("per_tensor", cls), ("flat", flat_8bit.flat_class(cls))):
        ps = [torch.nn.Parameter(t.clone().to(device)) for t in init]
        opt = build(ps, lr=1e-4, min_8bit_size=args.min_8bit_size)
        if kind == "flat":
            row["log"] = flat_8bit.flatten_optimizer(opt)
        for p, g in zip(ps, grads):
            p.grad = g.clone()  # the flat optimizer's first step copies it into its flat grad buffer
        row[f"{kind}_host_ms"], row[f"{kind}_wall_ms"] = _timed(opt, args.steps, device)
        params[kind] = ps
        if kind == "flat":
            row["flat_launches"] = sum(len(f.runs) for f in opt._flats or [])
    row["speedup_wall"] = row["per_tensor_wall_ms"] / row["flat_wall_ms"]
    row["bitwise_equal"] = all(
        torch.equal(a.detach(), b.detach()) for a, b in zip(params["per_tensor"], params["flat"])
    )
    return row


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(run(_parse(argv))), flush=True)


if __name__ == "__main__":
    main()
