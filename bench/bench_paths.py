"""Per-layer cost of each LoKr / LoHa path as the network runs it, at the real SDXL and Anima layer shapes.

Calibrates `networks.functional.dispatch` against the modules themselves (the fused node, `RebuildLinear`,
the bypass and Khatri–Rao paths), not against standalone functions. One layer step is what a training step
does to an adapted Linear under gradient checkpointing: a forward without grad, the recomputed forward with
grad, and the backward (grads to x and to the factors). Each row gives the µs per layer step over the bare
layer, in eager (wall time, synchronised: includes the host cost) and as a CUDA-graph replay (GPU time
only), and what the cost model picks for that shape in each mode. Params fp32, activations bf16 autocast.

GPU:  python bench/bench_paths.py --model sdxl
CPU smoke: python bench/bench_paths.py --device cpu --model tiny --iters 1 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_layers import _time_eager, _time_graph  # noqa: E402

from networks.loha import LoHaModule  # noqa: E402
from networks.lokr import LoKrModule  # noqa: E402
from networks.lora import LoRAModule  # noqa: E402
from networks.modules.adapter import AdapterModule, attach_adapter  # noqa: E402
from networks.network_args import NetworkArgs  # noqa: E402
from networks.paths import PathPolicy, select_loha_path, select_lokr_path  # noqa: E402

# (out, in, tokens, layers of this shape in the model): SDXL batch 4 at 1024², Anima batch 2 at 1024²
SHAPES = {
    "sdxl": [
        (1280, 1280, 4096, 380),  # 1280-ch blocks: q, k, v, out, attn2 q/out; proj_in/out
        (1280, 2048, 308, 120),  # attn2 k/v from the text context
        (10240, 1280, 4096, 60),  # ff.net.0.proj (GEGLU)
        (1280, 5120, 4096, 60),  # ff.net.2
        (640, 640, 16384, 62),
        (640, 2048, 308, 20),
        (5120, 640, 16384, 10),
        (640, 2560, 16384, 10),
    ],
    "anima": [
        (2048, 2048, 8192, 168),  # self-attn q/k/v/out, cross-attn q/out
        (2048, 1024, 1024, 56),  # cross-attn k/v from the 1024-wide context
        (8192, 2048, 8192, 28),  # mlp.layer1
        (2048, 8192, 8192, 28),  # mlp.layer2
    ],
    "tiny": [(48, 32, 64, 1), (64, 64, 32, 1)],
}

# variant -> (module factory, forced path attribute and value)
Variant = tuple[Callable[[nn.Linear], AdapterModule] | None, str | None, bool | None]


def _variants(rank: int, alpha: float) -> dict[str, Variant]:
    def lokr(lin: nn.Linear) -> AdapterModule:
        return LoKrModule.create("l", lin, 1.0, rank, alpha, NetworkArgs(algo="lokr"))

    def loha(lin: nn.Linear) -> AdapterModule:
        return LoHaModule("l", lin, 1.0, rank, alpha)

    def lora(lin: nn.Linear) -> AdapterModule:
        return LoRAModule("l", lin, 1.0, rank, alpha)

    return {
        "base": (None, None, None),
        "lora": (lora, None, None),
        "lokr_rebuild": (lokr, "use_factored", False),
        "lokr_bypass": (lokr, "use_factored", True),
        "loha_rebuild": (loha, "use_factored", False),
        "loha_khatri_rao": (loha, "use_factored", True),
    }


def _layer_step(lin: nn.Linear, x: torch.Tensor, gy: torch.Tensor) -> Callable:
    autocast = x.device.type == "cuda"

    def step() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            with torch.no_grad():  # checkpointed forward
                lin(x)
            y = lin(x)  # recomputed forward, with grad
        y.backward(gy)

    return step


def _model_choice(mod: AdapterModule, tokens: int, mode: str) -> str:
    policy = PathPolicy("auto", mode)
    if isinstance(mod, LoKrModule):
        L = mod.lokr_layout
        return select_lokr_path(policy, tokens, L.a, L.b, L.c, L.d)
    return select_loha_path(policy, tokens, mod.out_dim, mod.in_dim, mod.rank)


def bench_shape(o: int, i: int, n: int, count: int, args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows: list[dict] = []
    base = {}
    for name, (make, attr, value) in _variants(args.rank, args.alpha).items():
        torch.manual_seed(0)
        lin = nn.Linear(i, o).to(device, dtype).requires_grad_(False)
        row: dict = {"O": o, "I": i, "N": n, "count": count, "variant": name}
        if make is not None:
            mod = make(lin).to(device)
            with torch.no_grad():  # a nonzero branch, as after a few steps
                for p in mod.parameters():
                    p.add_(torch.randn_like(p) * 0.01)
            if attr is not None:
                setattr(mod, attr, value)
                row["model_eager"] = _model_choice(mod, n, "eager")
                row["model_graph"] = _model_choice(mod, n, "graph")
            attach_adapter(lin, mod)
            mod.train()
        x = torch.randn(n, i, device=device, dtype=dtype, requires_grad=True)
        gy = torch.randn(n, o, device=device, dtype=dtype)
        step = _layer_step(lin, x, gy)
        try:
            row["eager_us"] = round(1e3 * _time_eager(step, args.iters, device, args.repeats), 1)
            if device.type == "cuda":
                row["graph_us"] = round(1e3 * _time_graph(step, args.iters, args.repeats), 1)
        except Exception as e:  # one failing variant must not lose the rest of the table
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        if name == "base":
            base = row
        for key in ("eager_us", "graph_us"):
            if key in row and key in base:
                row[key.replace("_us", "_extra_us")] = round(row[key] - base[key], 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per shape, algorithm and mode: the measured faster path and the model's pick; and per model the
    step-level µs each policy costs (Σ count × extra) — measured best, model's picks, and each path forced."""
    out = []
    for algo, paths in (("lokr", ("rebuild", "bypass")), ("loha", ("rebuild", "khatri_rao"))):
        for mode in ("eager", "graph"):
            totals = {"best": 0.0, "model": 0.0, **{p: 0.0 for p in paths}}
            complete = True
            for shape in sorted({(r["O"], r["I"], r["N"]) for r in rows}):
                cand = {
                    r["variant"].split("_", 1)[1]: r
                    for r in rows
                    if (r["O"], r["I"], r["N"]) == shape and r["variant"].startswith(algo + "_")
                }
                key = f"{mode}_extra_us"
                if any(key not in c for c in cand.values()) or len(cand) != len(paths):
                    complete = False
                    continue
                count = next(iter(cand.values()))["count"]
                best = min(paths, key=lambda p: cand[p][key])
                pick = cand[paths[0]][f"model_{mode}"]
                out.append({"algo": algo, "mode": mode, "shape": shape, "best": best, "model": pick})
                totals["best"] += count * cand[best][key]
                totals["model"] += count * cand[pick][key]
                for p in paths:
                    totals[p] += count * cand[p][key]
            if complete:
                out.append(
                    {
                        "algo": algo,
                        "mode": mode,
                        "step_extra_ms": {k: round(v / 1e3, 2) for k, v in totals.items()},
                    }
                )
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="sdxl", choices=sorted(SHAPES))
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the fastest counts (host noise)")
    p.add_argument("--out", default=None, help="write all rows and the summary as JSON lines here")
    args = p.parse_args(argv)
    rows: list[dict] = []
    for o, i, n, count in SHAPES[args.model]:
        rows.extend(bench_shape(o, i, n, count, args))
    summary = summarize(rows)
    for s in summary:
        print(json.dumps(s), flush=True)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows + summary))
    return rows + summary


if __name__ == "__main__":
    main()
