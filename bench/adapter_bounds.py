"""What the exact adapter paths can cost at best in a graph-replayed SDXL step (issue 20), from the cost model.

Issue 20 asks for LoRA ≤ 1.10×, LoKr ≤ 1.30× and LoHa ≤ 1.50× of the no-adapter floor with results equal
to the plain path. This script sums, over the 722 Linear layers an SDXL network adapts (their shapes and
the tokens each one sees, from a meta-device forward of the real U-Net, batch 4, 1024²), the modelled
GPU time per step of:

- floor GEMMs: the frozen layer's own three GEMMs (forward, the checkpoint's recompute, grad x);
- the current paths: `networks.functional.dispatch`'s graph-mode cost of the path it picks per layer
  (LoKr: rebuild or bypass; LoHa: rebuild or Khatri-Rao; LoRA: the fused node's thin products);
- a bandwidth floor for an exact branch beside cuBLAS' base GEMM, with every adapter-side product fused
  into as few passes as exactness allows, all at the full memory bandwidth and no launch gaps:
  forward and recompute each read x once and read+write y once (the branch added to the base output);
  backward reads g once and reads+writes grad x once (the branch's grad x added), and reads x and g once
  more for the factor grads. ΔW, its factors and their grads are left out (O×I or less per layer). This
  is the least any exact kernel design can move while the base GEMM stays cuBLAS', for LoRA and for LoKr
  (whose W1·X·W2ᵀ makes one pass possible);
- LoHa's bound: its ΔW has rank up to r² (1 024 at r = 32, next to SDXL's and Anima's widths of 640–2 048),
  so its branch is GEMM work: four GEMMs of the layer's size a step (the branch's forward, its recompute,
  its grad x and grad ΔW), with building ΔW and the factor grads taken as free.

The ratio column is 1 + modelled extra / the measured floor step (`--floor_s`, session 12's H100 SDXL
batch-4 floor, 0.2788 s). The model's rates are dispatch.py's H100 calibration. Run on any CPU (seconds):

    python3 bench/adapter_bounds.py [--floor_s 0.2788] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ACT = 2  # bf16 bytes
# the measured graph-replayed floor steps (H100, session 12: SDXL batch 4, Anima batch 2, 1024²)
FLOORS = {"sdxl": 0.2788, "anima": 0.2647}


def layer_inventory(model: str, batch: int, resolution: int) -> Counter:
    """(out, in, tokens) → count over the Linear layers our networks adapt, from one meta-device forward of
    the real model (SDXL U-Net or Anima DiT) at `batch` × `resolution`²."""
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    import train_step_models as models

    from networks.lokr import create_network

    spec = argparse.Namespace(device="meta", tiny=False)
    net_model, call, ctx_dim, pooled_dim = (
        models._build_anima(spec) if model == "anima" else models.build_diffusers_unet(spec)
    )
    network = create_network(1.0, 32, 16, None, [], net_model)
    seen: Counter = Counter()

    def hook(mod, inputs, _out):
        x = inputs[0]
        seen[(mod.out_features, mod.in_features, x.numel() // x.shape[-1])] += 1

    for m in network.unet_loras:
        if isinstance(m.org_module, torch.nn.Linear):
            m.org_module.register_forward_hook(hook)
    lat = resolution // 8
    ch, ctx_len = (16, 512) if model == "anima" else (4, 77)
    x = torch.empty(batch, ch, lat, lat, device="meta")
    ctx = torch.empty(batch, ctx_len, ctx_dim, device="meta")
    pooled, time_ids = (
        torch.empty(batch, max(pooled_dim, 1), device="meta"),
        torch.empty(batch, 6, device="meta"),
    )
    real_autocast = torch.autocast
    # the DiT's fp32 islands open torch.autocast(..., enabled=False), which torch refuses on meta: a no-op here
    torch.autocast = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment]
    try:
        with torch.no_grad():
            call(net_model, x, torch.zeros(batch, device="meta"), ctx, pooled, time_ids)
    finally:
        torch.autocast = real_autocast
    return seen


def per_layer(o: int, i: int, n: int, rank: int) -> dict[str, float]:
    from networks.functional import dispatch
    from networks.functional.lokr import factorization

    g = dispatch.GRAPH
    gemm = dispatch._gemm(n, o, i)
    floor = 3 * dispatch.kernel_seconds(gemm, g)
    a, b = factorization(o)
    c, d = factorization(i)
    w2_rank = rank if rank < max(b, d) / 2 else None
    lokr = min(dispatch.lokr_linear_costs(n, a, b, c, d, w2_rank, mode="graph").values())
    loha = min(dispatch.loha_linear_costs(n, o, i, rank, mode="graph").values())
    # the fused LoRA node: forward (twice) x·Dᵀ and y += L·Uᵀ; backward g·U, grad x += (g·U)·D, gᵀ·L, (g·U)ᵀ·x
    thin_fwd = [
        (2.0 * n * i * rank, ACT * (n * i + n * rank)),
        (2.0 * n * o * rank, ACT * (2 * n * o + n * rank)),
    ]
    thin_bwd = [
        (2.0 * n * o * rank, ACT * (n * o + n * rank)),
        (2.0 * n * i * rank, ACT * (2 * n * i + n * rank)),
        (2.0 * n * o * rank, ACT * (n * o + n * rank)),
        (2.0 * n * i * rank, ACT * (n * i + n * rank)),
    ]
    lora = sum(dispatch.kernel_seconds(k, g) for k in thin_fwd * 2 + thin_bwd)
    # bandwidth floor of an exact fused branch (see the module docstring), no gaps
    passes = 2 * (n * i + 2 * n * o) + (n * o + 2 * n * i) + (n * i + n * o)
    fused_floor = dispatch.kernel_seconds((0.0, ACT * passes), g, gap=False)
    return {
        "floor_gemms": floor,
        "lora": lora,
        "lokr": lokr,
        "loha": loha,
        "lora_bound": fused_floor,
        "lokr_bound": fused_floor,
        # ΔW = (A1·B1)⊙(A2·B2) has rank up to r²: its branch is GEMM work, x·ΔWᵀ twice and grad x, grad ΔW
        # once; everything else (building ΔW, the factor grads) taken as free, as if fused into those GEMMs
        "loha_bound": min(4 * dispatch.kernel_seconds(gemm, g, gap=False), loha),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["sdxl", "anima"], default="sdxl")
    p.add_argument(
        "--floor_s", type=float, default=None, help="measured floor step, s (default: H100, session 12)"
    )
    p.add_argument("--batch", type=int, default=None, help="default: 4 (SDXL), 2 (Anima)")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    batch = args.batch or (2 if args.model == "anima" else 4)
    floor_s = args.floor_s or FLOORS[args.model]
    inv = layer_inventory(args.model, batch, args.resolution)
    totals: Counter = Counter()
    for (o, i, n), count in inv.items():
        for k, v in per_layer(o, i, n, args.rank).items():
            totals[k] += count * v
    out = {
        "model": args.model,
        "layers": sum(inv.values()),
        "shapes": [{"out": o, "in": i, "tokens": n, "layers": c} for (o, i, n), c in sorted(inv.items())],
        "seconds": {k: round(v, 5) for k, v in totals.items()},
        "ratio_to_floor": {k: round(1 + totals[k] / floor_s, 3) for k in totals if k != "floor_gemms"},
        "floor_gemm_share": round(totals["floor_gemms"] / floor_s, 3),
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"{out['layers']} adapted Linear layers; their floor GEMMs model {totals['floor_gemms']:.4f} s "
            f"({out['floor_gemm_share']:.0%} of the {floor_s} s floor)"
        )
        for algo in ("lora", "lokr", "loha"):
            print(
                f"{algo}: current paths {out['ratio_to_floor'][algo]:.3f}x, "
                f"exact bound {out['ratio_to_floor'][algo + '_bound']:.3f}x"
            )
    return out


if __name__ == "__main__":
    main()
