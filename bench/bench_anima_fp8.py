"""fp8 base for Anima: peak memory, per-layer output error and the loss curve against bf16.

Sections (`--sections`, comma-separated; each writes one JSON file into `--out`):
  errors  relative output error of each kind of base Linear (real shapes, random init, plus the same weights
          with a log-normal spread of row norms as trained weights have) against the bf16 weight: plain fp8,
          one scale per tensor, one scale per output channel (what --fp8_scaled stores). The bf16 weight's own
          error against fp32 is given for scale. -> fp8_errors.json
  memory  peak GPU memory of training steps (random-init DiT of the real config, 1024², batch 1, LoKr and
          LoHa dim 32, gradient checkpointing, AdamW) for bf16 / fp8 / fp8 scaled, with and without
          --blocks_to_swap and with cached or live Qwen3 outputs. -> fp8_memory.json
  curve   the loss of `--curve_steps` steps from one seed (same base, data, noise and timesteps) for bf16,
          fp8 and fp8 scaled; the fp8 runs' deviation from the bf16 curve. -> fp8_curve.json
Each training run is its own process, so peak memory is per configuration (--smoke on the CPU runs them
in this process: there is no peak to measure).

GPU:   python bench/bench_anima_fp8.py --out bench/results/fp8
Smoke: python bench/bench_anima_fp8.py --smoke --out /tmp/fp8   (tiny DiT on the CPU, a few steps)
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

PRECISIONS = ("bf16", "fp8", "fp8_scaled")
MODULES = {"lokr": "networks.lokr", "loha": "networks.loha"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the JSON results")
    p.add_argument("--sections", default="errors,memory,curve")
    p.add_argument("--smoke", action="store_true", help="tiny DiT on the CPU, few steps (checks the script)")
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --smoke")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--algos", default="lokr,loha")
    p.add_argument("--blocks_to_swap", type=int, default=14, help="blocks swapped in the memory runs")
    p.add_argument(
        "--memory_te",
        choices=("both", "cached", "live"),
        default="both",
        help="memory runs with cached and/or live Qwen3 outputs",
    )
    p.add_argument("--memory_steps", type=int, default=3, help="measured steps after one warm-up step")
    p.add_argument("--curve_steps", type=int, default=100)
    p.add_argument("--curve_algo", default="lokr")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--tokens", type=int, default=4096, help="activation rows in the errors section")
    p.add_argument("--run_timeout", type=float, default=900.0, help="seconds per training process")
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.device = args.device or "cpu"
        args.resolution, args.dim, args.blocks_to_swap = 64, 4, 1
        args.memory_steps, args.curve_steps, args.tokens = 1, min(args.curve_steps, 3), 64
    args.device = args.device or "cuda"
    return args


def dit_config(smoke: bool):
    from library.anima.model import AnimaConfig, tiny_anima_config

    if not smoke:
        return AnimaConfig()
    cfg = tiny_anima_config()
    cfg.num_blocks = 3  # block swap keeps two blocks on the device
    return cfg


def qwen3_config(smoke: bool):
    from transformers import Qwen3Config

    from library.anima.loading import tiny_qwen3_config

    if smoke:
        return tiny_qwen3_config()
    cfg = Qwen3Config(  # Qwen3-0.6B
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
        rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=True, attention_bias=False,
    )  # fmt: skip
    cfg._attn_implementation = "sdpa"
    return cfg


# ------------------------------------------------------------------------------------------- errors
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def layer_errors(args: argparse.Namespace) -> list[dict]:
    """One row per distinct base Linear of a DiT block and an adapter block (real shapes)."""
    from library.anima.loading import anima_fp8_layer
    from library.anima.model import Block, LLMAdapterTransformerBlock
    from networks import fp8

    cfg = dit_config(args.smoke)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    with dev:
        parts = {
            "blocks.0": Block(cfg),
            "llm_adapter.blocks.0": LLMAdapterTransformerBlock(
                cfg.adapter_source_dim, cfg.adapter_model_dim, cfg.adapter_num_heads, cfg.adapter_mlp_hidden
            ),
        }
    gen = torch.Generator(device="cpu").manual_seed(1)
    rows = []
    for prefix, part in parts.items():
        for name, mod in part.named_modules():
            full = f"{prefix}.{name}"
            if not isinstance(mod, nn.Linear) or not anima_fp8_layer(full):
                continue
            # the DiT's image tokens at this resolution; the adapter and cross-attn k/v see 512 text tokens
            text = prefix.startswith("llm_adapter") or name in ("cross_attn.k_proj", "cross_attn.v_proj")
            n = min(512, args.tokens) if text else args.tokens
            x = torch.randn(n, mod.in_features, generator=gen).to(dev, torch.bfloat16).float()
            spread = torch.exp(torch.randn(mod.out_features, 1, generator=gen)).to(dev)
            for kind, w in (("init", mod.weight.detach()), ("row_spread", mod.weight.detach() * spread)):
                w16 = w.to(torch.bfloat16).float()
                ref = F.linear(x, w16)
                row = {"layer": full, "shape": list(w.shape), "tokens": n, "weights": kind,
                       "bf16_vs_fp32": _rel(ref, F.linear(x, w.float()))}  # fmt: skip
                for label in (
                    "plain",
                    "per_tensor",
                    "per_channel",
                ):  # quantized from fp32, as the trainer does
                    if label == "per_tensor":  # one scale: the tensor's largest magnitude onto 448
                        s = (w.abs().amax() / fp8.FP8_MAX).reshape(1, 1)
                        w8 = (w / s).to(fp8.FP8_DTYPE)
                    else:
                        w8, s = fp8.quantize(w, label == "per_channel")
                    row[label] = _rel(F.linear(x, fp8.dequantize(w8, s, torch.float32)), ref)
                    row[f"{label}_subnormal_frac"] = float(
                        (w8.float().abs() < 2.0**-6).logical_and(w8.float() != 0).float().mean()
                    )
                rows.append(row)
    return rows


def summarize_errors(rows: list[dict]) -> dict:
    out = {}
    for kind in sorted({r["weights"] for r in rows}):
        sel = [r for r in rows if r["weights"] == kind]
        out[kind] = {
            k: {"mean": sum(r[k] for r in sel) / len(sel), "max": max(r[k] for r in sel)}
            for k in ("bf16_vs_fp32", "plain", "per_tensor", "per_channel")
        }
    return out


# ------------------------------------------------------------------------------------------- training
def build_run(spec: dict, args: argparse.Namespace) -> dict:
    """Model, network, optimizer and fixed data of one training configuration."""
    from library.anima.loading import anima_fp8_layer
    from library.anima.model import Anima
    from library.anima.trainer import enable_block_swap
    from networks import fp8

    dev = torch.device(args.device)
    torch.manual_seed(0)
    with dev:
        dit = Anima(dit_config(args.smoke))  # fp32 on the device: the fp8 weights are quantized from it
    dit.requires_grad_(False)
    if spec["precision"] != "bf16":
        fp8.apply_fp8_base(dit, spec["precision"] == "fp8_scaled", anima_fp8_layer)
    fp8.cast_keeping_fp8(dit, dev, torch.bfloat16)
    if spec["swap"]:
        enable_block_swap(dit, spec["swap"], dev)
    if spec.get("graph"):  # the trainer's --cuda_graph: checkpointing without RNG state, a replayed DiT call
        from library.training.cuda_graph import enable_checkpointing_without_rng

        enable_checkpointing_without_rng(dit)
    else:
        dit.enable_gradient_checkpointing()
    dit.train(True)
    te = None
    if not spec["te_cached"]:
        from transformers import Qwen3Model

        with dev:
            te = Qwen3Model(qwen3_config(args.smoke)).to(torch.bfloat16).eval().requires_grad_(False)
    module = __import__(MODULES[spec["algo"]], fromlist=["create_network"])
    torch.manual_seed(1)
    net = module.create_network(1.0, args.dim, args.alpha, None, None, dit)
    net.apply_to(None, dit, apply_text_encoder=False, apply_unet=True)
    net.to(dev)
    groups = net.prepare_optimizer_params_with_multiple_te_lrs(None, args.lr, args.lr)
    groups = groups[0] if isinstance(groups, tuple) else groups
    params = [p for g in groups for p in g["params"]]
    gen = torch.Generator(device="cpu").manual_seed(2)
    lat = args.resolution // 8
    cfg = dit.config
    data = {
        "latents": [torch.randn(1, 16, lat, lat, generator=gen).to(dev) for _ in range(4)],
        "states": [torch.randn(1, 512, cfg.adapter_source_dim, generator=gen).to(dev) for _ in range(4)],
        "ids": torch.randint(0, qwen3_config(args.smoke).vocab_size, (1, 512), generator=gen).to(dev),
        "t5_ids": torch.randint(0, cfg.adapter_vocab_size, (1, 512), generator=gen).to(dev),
        "mask": torch.ones(1, 512, dtype=torch.long, device=dev),
    }
    model = dit
    if spec.get("graph"):
        from library.training.cuda_graph import GraphedCall

        model = GraphedCall(dit, params)
    return {"dit": dit, "model": model, "te": te, "net": net, "params": params, "data": data, "dev": dev,
            "opt": torch.optim.AdamW(params, lr=args.lr), "graph": bool(spec.get("graph"))}  # fmt: skip


def train_step(run: dict, i: int, gen: torch.Generator) -> float:
    from library.anima.loss import FlowLossConfig, flow_matching_loss

    dit, te, data, dev = run["dit"], run["te"], run["data"], run["dev"]
    latents = data["latents"][i % 4]
    noise = torch.randn(latents.shape, generator=gen).to(dev)
    sigma = torch.sigmoid(torch.randn(1, generator=gen))
    ns = FlowLossConfig(loss_type="l2", weighting_scheme="uniform")
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        if te is None:  # cached Qwen3 outputs
            states = data["states"][i % 4].to(torch.bfloat16)
        else:
            with torch.no_grad():
                states = te(input_ids=data["ids"], attention_mask=data["mask"]).last_hidden_state
        ctx = dit.run_llm_adapter(states, data["t5_ids"], data["mask"], data["mask"])
        loss = flow_matching_loss(
            run["model"], latents, lambda: ctx, ns, torch.ones(1), torch.bfloat16, noise, sigma
        )
        loss = loss.mean()
    loss.backward()
    run["opt"].step()
    run["opt"].zero_grad(set_to_none=not run["graph"])  # a graph's grads stay bound to its buffers
    return float(loss.detach().float().cpu())


def run_single(spec: dict, args: argparse.Namespace) -> dict:
    cuda = args.device.startswith("cuda")
    run = build_run(spec, args)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model_gib = torch.cuda.memory_allocated() / 2**30 if cuda else None
    gen = torch.Generator(device="cpu").manual_seed(3)
    n = spec["steps"]
    losses, t0 = [], time.perf_counter()
    for i in range(n):
        losses.append(train_step(run, i, gen))
    if cuda:
        torch.cuda.synchronize()
    return {**spec, "losses": losses, "seconds_per_step": (time.perf_counter() - t0) / max(n, 1),
            "model_gib": model_gib,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
            "trainable_params": sum(p.numel() for p in run["params"])}  # fmt: skip


def spawn(spec: dict, argv: list[str], args: argparse.Namespace) -> dict:
    """One configuration in its own process (its own peak memory); in this one for --smoke on the CPU."""
    if args.smoke and not args.device.startswith("cuda"):
        return run_single(spec, args)
    timeout = args.run_timeout
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--single", json.dumps(spec)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        return {**spec, "error": (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]}
    return json.loads(lines[-1])


def memory_specs(args: argparse.Namespace) -> list[dict]:
    return [
        {"precision": p, "algo": a, "swap": s, "te_cached": c, "steps": 1 + args.memory_steps}
        for a in args.algos.split(",")
        for c in {"both": (True, False), "cached": (True,), "live": (False,)}[args.memory_te]
        for s in (0, args.blocks_to_swap)
        for p in PRECISIONS
    ]


def curve_summary(runs: list[dict]) -> dict:
    ref = next((r["losses"] for r in runs if r["precision"] == "bf16" and "losses" in r), None)
    out = {}
    for r in runs:
        if "losses" not in r or ref is None:
            continue
        if r.get("graph"):
            eager = [
                e for e in runs if e["precision"] == r["precision"] and not e.get("graph") and "losses" in e
            ]
            diffs = (
                [abs(a - b) for a, b in zip(r["losses"], eager[0]["losses"], strict=True)] if eager else []
            )
            out[r["precision"] + "_cuda_graph"] = {"max_abs_diff_vs_eager": max(diffs, default=None)}
            continue
        d = [abs(a - b) for a, b in zip(r["losses"], ref, strict=True)]
        k = max(1, len(ref) // 10)  # the last tenth of the run, averaged
        out[r["precision"]] = {
            "mean_abs_diff_vs_bf16": sum(d) / len(d),
            "max_abs_diff_vs_bf16": max(d),
            "mean_loss": sum(r["losses"]) / len(r["losses"]),
            "last_tenth_mean": sum(r["losses"][-k:]) / k,
            "finite": all(math.isfinite(v) for v in r["losses"]),
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.single:
        print(json.dumps(run_single(json.loads(args.single), args)))
        return {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    meta = {"device": device_name, "torch": torch.__version__, "smoke": args.smoke,
            "resolution": args.resolution, "dim": args.dim, "alpha": args.alpha}  # fmt: skip
    results: dict = {}
    sections = args.sections.split(",")
    if "errors" in sections:
        rows = layer_errors(args)
        results["errors"] = {**meta, "summary": summarize_errors(rows), "layers": rows}
    if "memory" in sections:
        runs = []
        for spec in memory_specs(args):  # printed as each ends: a run cut short keeps what it measured
            r = spawn(spec, argv, args)
            r.pop("losses", None)
            print(json.dumps(r), flush=True)
            runs.append(r)
        results["memory"] = {**meta, "blocks_to_swap": args.blocks_to_swap, "runs": runs}
    if "curve" in sections:
        specs = [{"precision": p, "algo": args.curve_algo, "swap": 0, "te_cached": True,
                  "steps": args.curve_steps} for p in PRECISIONS]  # fmt: skip
        if args.device.startswith("cuda"):  # --cuda_graph on the scaled fp8 base: the same curve expected
            specs.append({**specs[-1], "graph": True})
        runs = [spawn(s, argv, args) for s in specs]
        results["curve"] = {**meta, "summary": curve_summary(runs), "runs": runs}
    for name, res in results.items():
        (out / f"fp8_{name}.json").write_text(json.dumps(res, indent=1))
        print(f"{name}: {json.dumps(res.get('summary', ''))}")
    return results


if __name__ == "__main__":
    main()
