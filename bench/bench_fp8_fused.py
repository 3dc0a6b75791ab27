"""One adapted fp8 Linear (`--fp8_base`), forward + backward: the old `add_branch` path against the fused node.

Before, an fp8 base kept its own upcasting node and the branch was added beside it (`add_branch`): x read
twice, grad x written twice and added, several autograd nodes. Now the fused node (networks.paths
`fused_node`) runs base and branch as one, dequantizing the fp8 weight inside in forward and backward. Each
row is one (shape, algo, fp8 kind, path): eager ms per forward+backward (synchronised wall time, includes
the host cost), CUDA-graph replay ms (GPU time only) and the step's peak memory over what was allocated
before it. Params fp32, activations bf16 under autocast, as in training. Prints JSON lines.

GPU:  python bench/bench_fp8_fused.py
CPU smoke: python bench/bench_fp8_fused.py --device cpu --shapes tiny --iters 1 --repeats 1
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

from networks import fp8, paths  # noqa: E402
from networks.loha import LoHaModule  # noqa: E402
from networks.lokr import LoKrModule  # noqa: E402
from networks.lora import LoRAModule  # noqa: E402
from networks.modules.adapter import AdapterModule, attach_adapter  # noqa: E402
from networks.modules.patching import original_forward  # noqa: E402
from networks.network_args import NetworkArgs  # noqa: E402

# (name, out, in, tokens): a real layer of each model (SDXL batch 4 at 1024², Anima batch 2 at 1024²)
SHAPES = {
    "real": [("anima_attn", 2048, 2048, 8192), ("sdxl_640", 640, 640, 4096), ("sdxl_1280", 1280, 1280, 4096)],
    "tiny": [("tiny", 48, 32, 64)],
}


def _adapter(algo: str, lin: nn.Linear, rank: int, alpha: float) -> AdapterModule:
    if algo == "lokr":
        return LoKrModule.create("l", lin, 1.0, rank, alpha, NetworkArgs(algo="lokr"))
    if algo == "loha":
        return LoHaModule("l", lin, 1.0, rank, alpha)
    return LoRAModule("l", lin, 1.0, rank, alpha)


def _layer(
    o: int, i: int, scaled: bool, algo: str | None, args: argparse.Namespace
) -> tuple[nn.Linear, AdapterModule | None]:
    """A frozen bf16 nn.Linear converted to fp8 (as `--fp8_base` does), with an adapter attached."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    holder = nn.Sequential(nn.Linear(i, o)).to(device, torch.bfloat16).requires_grad_(False)
    fp8.apply_fp8_base(holder, scaled)
    lin = holder[0]
    if algo is None:
        return lin, None
    mod = _adapter(algo, lin, args.rank, args.alpha).to(device)
    mod.use_factored = False  # LoHa/LoKr: the rebuild, where the fused node applies
    with torch.no_grad():  # a nonzero branch, as after a few steps
        for p in mod.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    attach_adapter(lin, mod)
    mod.train()
    return lin, mod


def _step(
    call: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, gy: torch.Tensor
) -> Callable[[], None]:
    autocast = x.device.type == "cuda"

    def step() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            y = call(x)
        y.backward(gy)

    return step


def _peak_mib(step: Callable[[], None], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)


def bench_one(name: str, o: int, i: int, n: int, scaled: bool, algo: str | None, path: str, args) -> dict:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lin, mod = _layer(o, i, scaled, algo, args)
    x = torch.randn(n, i, device=device, dtype=dtype, requires_grad=True)
    gy = torch.randn(n, o, device=device, dtype=dtype)
    row: dict = {"shape": name, "O": o, "I": i, "N": n, "fp8": "scaled" if scaled else "plain"}
    row.update(algo=algo or "base", path=path)
    if mod is None:
        call = lin  # the bare fp8 layer: the floor both paths add to
    elif path == "add_branch":
        orig = original_forward(lin)
        call = lambda x: mod.add_branch(x, orig(x))  # noqa: E731 - the patched call before this change
    else:
        call = lin  # the patched forward: the fused node
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            row["forward_path"] = paths.forward_path(mod, x)
    step = _step(call, x, gy)
    try:
        row["eager_ms"] = round(_time_eager(step, args.iters, device, args.repeats), 3)
        row["peak_mib"] = _peak_mib(step, device)  # before a graph's private pool holds memory
        if device.type == "cuda":
            row["graph_ms"] = round(_time_graph(step, args.iters, args.repeats), 3)
    except Exception as e:  # one failing variant must not lose the rest
        row["error"] = f"{type(e).__name__}: {e}"[:300]
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--shapes", default="real", choices=sorted(SHAPES))
    p.add_argument("--algos", default="lora,lokr,loha")
    p.add_argument("--fp8", default="plain,scaled", help="fp8 kinds: plain, scaled (--fp8_scaled)")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the fastest counts (host noise)")
    p.add_argument("--out", default=None, help="also write the rows as JSON lines here")
    args = p.parse_args(argv)
    rows: list[dict] = []
    for name, o, i, n in SHAPES[args.shapes]:
        for kind in args.fp8.split(","):
            scaled = kind == "scaled"
            rows.append(bench_one(name, o, i, n, scaled, None, "base", args))
            for algo in args.algos.split(","):
                for path in ("add_branch", "fused"):
                    rows.append(bench_one(name, o, i, n, scaled, algo, path, args))
    rows += summarize(rows)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per shape, fp8 kind and algo: each path's ms over the bare fp8 layer, and fused / add_branch."""
    out = []
    for r in rows:
        if r["path"] != "fused":
            continue
        same = [q for q in rows if (q["shape"], q["fp8"]) == (r["shape"], r["fp8"])]
        base = next(q for q in same if q["path"] == "base")
        old = next(q for q in same if q["algo"] == r["algo"] and q["path"] == "add_branch")
        s: dict = {"summary": r["shape"], "fp8": r["fp8"], "algo": r["algo"]}
        for key in ("eager_ms", "graph_ms"):
            if all(key in q for q in (base, old, r)):
                s[key.replace("_ms", "_extra_ms")] = {
                    "add_branch": round(old[key] - base[key], 3),
                    "fused": round(r[key] - base[key], 3),
                }
                s[key.replace("_ms", "_ratio")] = round(r[key] / old[key], 3)
        if all(q.get("peak_mib") is not None for q in (old, r)):
            s["peak_mib"] = {"add_branch": old["peak_mib"], "fused": r["peak_mib"]}
        print(json.dumps(s), flush=True)
        out.append(s)
    return out


if __name__ == "__main__":
    main()
