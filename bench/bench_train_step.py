"""Training-step benchmark: SDXL U-Net (real config, random init) with and without adapters.

Each variant runs in its own process and prints one JSON line: median/min step time, peak memory,
trainable parameters and adapted-module count. Step = forward, loss, backward, optimizer step.

Variants (comma-separated; each may carry its own network args after colons, e.g.
`ours-lokr:factor=8:full_matrix=True`, `ours-loha:conv_dim=16:conv_alpha=8:use_tucker=True`):
  floor            diffusers U-Net, no adapter, latents requiring grad (the floor for our networks)
  ours-lora|loha|lokr   our networks on the diffusers U-Net
  sd-floor         sd-scripts' own SDXL U-Net class, no adapter (the floor for sd-scripts' networks)
  sd-lora|loha|lokr     sd-scripts' networks (from --sd_scripts_path) on sd-scripts' U-Net
  anima-floor, anima-lora|loha|lokr   our Anima DiT (real config, random init; batch/resolution as given)
  sdanima-floor, sdanima-lora|loha|lokr   sd-scripts' Anima DiT and networks (lora_anima for LoRA)
Bench-only options (not network args): `path=auto|rebuild|bypass` forces our per-layer path choice
(networks.paths), `mode=eager|graph` picks its cost model, `compile=1` compiles the
repeated transformer blocks (fullgraph), `cmode=reduce-overhead|max-autotune-no-cudagraphs|...` passes
torch.compile's mode (the trainer's --compile_mode), `graph=1` replays the model's forward and backward
as CUDA graphs (`library/training/cuda_graph.py`, the trainer's --cuda_graph), `gcrng=0` checkpoints without
saving the RNG state, `prof=1` adds the GPU time per kernel name of one step, `ecalls=N` runs each
input shape eagerly N times before capturing it (the trainer uses 1), `opt=adamw8bit` trains with the
trainer's AdamW8bit (bitsandbytes with our flat update; sd-* variants: bitsandbytes' own) instead of
torch's AdamW, `fp8=1` stores the frozen Linear/Conv2d weights as float8_e4m3fn and the rest in float32
(the trainer's --fp8_base; our models only).
--mem_peak records the allocator's history (torch.cuda.memory._record_memory_history) from before the
model is built to the end and adds `mem_peak` to the variant's line: the peak of allocated memory from the
first warm-up step on, what is live there grouped by where it was allocated, and what is live between
steps before the measured ones (bench/mem_peak.py).

Example (GPU):
  python bench/bench_train_step.py --sd_scripts_path baselines/sd-scripts \
      --variants floor,ours-lora,ours-loha,ours-lokr,sd-floor,sd-lora,sd-loha,sd-lokr
CPU smoke run: python bench/bench_train_step.py --tiny --device cpu --steps 2 --warmup 1 --variants floor,ours-loha
What is live at the peak, as the trainer runs it (GPU):
  python bench/bench_train_step.py --mem_peak --steps 2 --warmup 3 \
      --variants ours-loha:opt=adamw8bit:fp8=1,ours-loha:graph=1:gcrng=0:mode=graph:ecalls=1:opt=adamw8bit:fp8=1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
NETWORK_MODULES = {"lora": "networks.lora", "loha": "networks.loha", "lokr": "networks.lokr"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="floor,ours-lora,ours-loha,ours-lokr")
    p.add_argument(
        "--sd_scripts_path", default=None, help="checkout of kohya-ss/sd-scripts (baseline variants)"
    )
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--network_args", nargs="*", default=[], help="extra key=value network args")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no_gradient_checkpointing", action="store_true")
    p.add_argument("--tiny", action="store_true", help="tiny SDXL config (CPU smoke runs)")
    p.add_argument("--variant_timeout", type=float, default=420.0, help="seconds per variant process")
    p.add_argument(
        "--mem_peak", action="store_true", help="report what is live at the peak of allocated memory"
    )
    p.add_argument("--mem_entries", type=int, default=1_000_000, help="--mem_peak: allocator events kept")
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _split_network_args(tokens: list[str]) -> dict[str, str]:
    out = {}
    for tok in tokens:
        key, sep, value = tok.partition("=")
        if not sep:
            raise SystemExit(f"--network_args: expected key=value, got {tok!r}")
        out[key] = value
    return out


def _load_by_path(name: str, path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def _load_cuda_graph_module():
    """library/training/cuda_graph.py by path: sd-* variants put sd-scripts' own `library` package first on sys.path."""
    return _load_by_path("lohakr_cuda_graph", REPO_ROOT / "library" / "training" / "cuda_graph.py")


models = _load_by_path("lohakr_train_step_models", REPO_ROOT / "bench" / "train_step_models.py")


_FALSE = ("0", "false", "False")


@dataclass(frozen=True)
class _Variant:
    """One variant string parsed: model family, adapter algorithm, network args and the bench-only options."""

    name: str
    family: str
    algo: str
    net_kwargs: dict[str, str]
    path: str | None
    mode: str | None
    compile_blocks: bool
    compile_mode: str | None
    graph: bool
    gc_rng: bool
    profile: bool
    eager_calls: int
    optimizer: str
    fp8: bool

    @property
    def is_sd(self) -> bool:
        return self.family in ("sd", "sdanima")

    @property
    def is_anima(self) -> bool:
        return self.family in ("anima", "sdanima")


def _parse_variant(variant: str, network_args: list[str]) -> _Variant:
    name, *opts = variant.split(":")
    family, _, algo = name.partition("-")
    if any(o.startswith("opt=") and o not in ("opt=adamw", "opt=adamw8bit") for o in opts):
        raise SystemExit(f"variant {variant!r}: opt= takes adamw or adamw8bit")
    if name == "floor":
        algo = ""
    net_kwargs = _split_network_args(network_args)
    net_kwargs.update(_split_network_args(opts))
    # the bench-only options are popped so that the network never sees them
    return _Variant(
        name=variant,
        family=family,
        algo=algo,
        path=net_kwargs.pop("path", None),
        mode=net_kwargs.pop("mode", None),
        compile_blocks=net_kwargs.pop("compile", "0") not in _FALSE,
        compile_mode=net_kwargs.pop("cmode", None),
        graph=net_kwargs.pop("graph", "0") not in _FALSE,
        gc_rng=net_kwargs.pop("gcrng", "1") not in _FALSE,
        profile=net_kwargs.pop("prof", "0") not in _FALSE,
        eager_calls=int(net_kwargs.pop("ecalls", "0")),
        optimizer=net_kwargs.pop("opt", "adamw"),
        fp8=net_kwargs.pop("fp8", "0") not in _FALSE,
        net_kwargs=net_kwargs,
    )


def _build_model(args: argparse.Namespace, v: _Variant, device, dtype):
    """The frozen model on the device in training mode, with its gradient checkpointing."""
    args.graph_capture = v.graph
    builder = models.BUILDERS.get(v.family, models.build_diffusers_unet)
    unet, call, ctx_dim, pooled_dim = builder(args)
    unet.requires_grad_(False)
    if v.fp8:
        _to_fp8_base(unet, v, device, dtype)
    else:
        unet.to(device=device, dtype=dtype)
    if not args.no_gradient_checkpointing:
        if v.gc_rng or v.is_sd:
            unet.enable_gradient_checkpointing()
        else:  # gcrng=0: recompute without saving/restoring the RNG state (nothing random inside)
            sys.path.insert(0, str(REPO_ROOT))
            from library.training.cuda_graph import enable_checkpointing_without_rng

            enable_checkpointing_without_rng(unet)
    unet.train()
    return unet, call, ctx_dim, pooled_dim


def _to_fp8_base(model, v: _Variant, device, dtype) -> None:
    """The trainer's --fp8_base: weights stored as float8_e4m3fn (upcast per layer under autocast); SDXL:
    every Linear/Conv2d, the rest in float32; Anima: the layers `anima_fp8_layer` names, the rest in `dtype`."""
    import torch

    if v.is_sd:
        raise SystemExit(f"variant {v.name!r}: fp8=1 is for our models only")
    from networks.fp8 import apply_fp8_base, cast_keeping_fp8

    if v.is_anima:
        from library.anima.loading import anima_fp8_layer

        apply_fp8_base(model, include=anima_fp8_layer)
        cast_keeping_fp8(model, device, dtype)
        return
    apply_fp8_base(model)
    cast_keeping_fp8(model, device, torch.float32)


def _make_optimizer(v: _Variant, params: list):
    """torch's AdamW, or the trainer's AdamW8bit (`opt=adamw8bit`): bitsandbytes' class with our flat update
    mixed in and laid out now that the network is on its device, as the trainer does (sd-* variants get
    bitsandbytes' own class, as sd-scripts uses it)."""
    import torch

    if not params:
        return None
    if v.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=1e-4)
    import bitsandbytes as bnb

    if v.is_sd:
        return bnb.optim.AdamW8bit(params, lr=1e-4)
    from library.training import flat_8bit

    optimizer = flat_8bit.flat_class(bnb.optim.AdamW8bit)(params, lr=1e-4)
    flat_8bit.flatten_optimizer(optimizer)
    return optimizer


def _build_network(args: argparse.Namespace, v: _Variant, unet, device):
    """The variant's adapter network applied to `unet`: (network or None, trainable params, module count)."""
    if not v.algo or v.algo == "floor":
        return None, [], 0
    module_name = (
        "networks.lora_anima" if v.family == "sdanima" and v.algo == "lora" else NETWORK_MODULES[v.algo]
    )
    module = __import__(module_name, fromlist=["create_network"])
    network = module.create_network(1.0, args.dim, args.alpha, None, [], unet, **v.net_kwargs)
    if (v.path is not None or v.mode is not None) and hasattr(network, "set_path_policy"):
        network.set_path_policy(v.path or "auto", v.mode or "eager")
    network.apply_to([], unet, apply_text_encoder=False, apply_unet=True)
    network.to(device)
    if hasattr(network, "prepare_optimizer_params_with_multiple_te_lrs"):
        groups = network.prepare_optimizer_params_with_multiple_te_lrs(None, 1e-4, 1e-4)
    else:
        groups = network.prepare_optimizer_params(None, 1e-4, 1e-4)
    if isinstance(groups, tuple):
        groups = groups[0]
    params = [p for g in groups for p in g["params"]]
    if hasattr(network, "prepare_grad_etc"):
        network.prepare_grad_etc([], unet)
    n_modules = sum(1 for _ in getattr(network, "unet_loras", [])) or sum(
        1 for m in network.modules() if m is not network and hasattr(m, "multiplier")
    )
    return network, params, n_modules


def _compile_blocks(unet, compile_mode: str | None) -> None:
    # regional compile: one graph per distinct transformer-block shape, adapters traced inside
    blocks = [m for m in unet.modules() if type(m).__name__ in ("BasicTransformerBlock", "Block")]
    for blk in blocks:
        blk.compile(fullgraph=True, **({"mode": compile_mode} if compile_mode else {}))


@dataclass
class _Inputs:
    x0: Any
    noise: Any
    ctx: Any
    pooled: Any
    time_ids: Any
    timesteps: Any

    def model_args(self) -> tuple:
        """In the order every builder's `call` takes them after the model."""
        return self.x0, self.timesteps, self.ctx, self.pooled, self.time_ids


def _make_inputs(
    args: argparse.Namespace, is_anima: bool, ctx_dim: int, pooled_dim: int, device, dtype
) -> _Inputs:
    import torch

    latent = 2 if args.tiny else args.resolution // 8
    if is_anima:
        latent = 4 if args.tiny else args.resolution // 8
    b = args.batch
    # drawn in a fixed order from one seeded CPU generator: the same inputs on every device
    gen = torch.Generator(device="cpu").manual_seed(0)
    ch, ctx_len = (16, 512) if is_anima else (4, 77)
    x0 = torch.randn(b, ch, latent, latent, generator=gen).to(device, dtype)
    noise = torch.randn(b, ch, latent, latent, generator=gen).to(device, dtype)
    ctx = torch.randn(b, ctx_len, ctx_dim, generator=gen).to(device, dtype)
    pooled = torch.randn(b, max(pooled_dim, 1), generator=gen).to(device, dtype)
    time_ids = torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * b, dtype=dtype, device=device)
    timesteps = torch.randint(0, 1000, (b,), generator=gen).to(device)
    return _Inputs(x0, noise, ctx, pooled, time_ids, timesteps)


def _make_step(model_call, inputs: _Inputs, optimizer, graph: bool, device, dtype, autocast: bool):
    """One training step (forward, loss, backward, optimizer step) and the device sync."""
    import torch

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            pred = model_call(*inputs.model_args())
        loss = torch.nn.functional.mse_loss(pred.float(), inputs.noise.float())
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=not graph)
        else:
            inputs.x0.grad = None
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step, sync


@dataclass
class _Timing:
    times: list[float]
    warmup_s: float
    loss: Any  # the last timed step's loss tensor
    peak_gib: float | None
    reserved_gib: float | None


def _time_steps(step, sync, warmup: int, steps: int, device, mark=None) -> _Timing:
    """`mark(name)`, when given, is called before the warm-up ("warmup") and before the timed steps
    ("measured")."""
    import torch

    if mark is not None:
        mark("warmup")
    t_warm = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - t_warm
    if mark is not None:
        mark("measured")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # reserved memory cannot be reset: it includes the warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    # a replayed graph allocates nothing (its pool was filled at capture), so for graph=1 only the
    # reserved memory shows its activations; it is recorded for every variant to compare like with like
    reserved = torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else None
    return _Timing(times, warmup_s, loss, peak, reserved)


def _count_fast_path_modules(network, v: _Variant, eager_forward) -> int:
    """Our modules that took the bypass / Khatri–Rao path (networks.functional.dispatch)."""
    import torch

    if v.compile_blocks:  # compiled modules choose without filling their cache: one eager pass fills it
        with torch.compiler.set_stance("force_eager"), torch.no_grad():
            eager_forward()
    caches = [m._path_cache for m in network.modules() if isinstance(getattr(m, "_path_cache", None), dict)]
    return sum(1 for c in caches if any(c.values()))


def run_single(args: argparse.Namespace) -> dict:
    import torch

    v = _parse_variant(args.single, args.network_args)
    device = torch.device(args.device)
    dtype = _dtype(args.dtype)
    torch.manual_seed(0)  # before building: every run starts from the same random init
    recorder = None
    if args.mem_peak:  # from before the model is built: its setup allocations get their stacks too
        mem_record = _load_by_path("lohakr_mem_record", REPO_ROOT / "bench" / "mem_record.py")
        recorder = mem_record.MemRecorder(device, args.mem_entries, roots=[str(REPO_ROOT)])

    unet, call, ctx_dim, pooled_dim = _build_model(args, v, device, dtype)
    network, params, n_modules = _build_network(args, v, unet, device)
    optimizer = _make_optimizer(v, params)
    if v.compile_blocks:
        _compile_blocks(unet, v.compile_mode)

    inputs = _make_inputs(args, v.is_anima, ctx_dim, pooled_dim, device, dtype)
    if network is None:  # the floor: something must need a gradient for the backward to run
        inputs.x0.requires_grad_(True)
    autocast = device.type == "cuda" and dtype != torch.float32
    model_call = lambda *t: call(unet, *t)  # noqa: E731
    if v.graph:  # forward and backward of the model replayed as CUDA graphs (the trainer's --cuda_graph)
        model_call = _load_cuda_graph_module().GraphedCall(model_call, params, eager_calls=v.eager_calls)
    step, sync = _make_step(model_call, inputs, optimizer, v.graph, device, dtype, autocast)

    timing = _time_steps(step, sync, args.warmup, args.steps, device, recorder and recorder.mark)
    mem = {"mem_peak": recorder.report()} if recorder is not None else {}
    top_kernels = _profile_kernels(step, sync) if v.profile else None
    fast = None
    if network is not None and not v.is_sd:

        def eager_forward():
            with torch.autocast(device.type, dtype=dtype, enabled=autocast):
                call(unet, *inputs.model_args())

        fast = _count_fast_path_modules(network, v, eager_forward)
    return {
        "variant": v.name,
        "median_s": statistics.median(timing.times),
        "min_s": min(timing.times),
        "peak_gib": timing.peak_gib,
        "peak_reserved_gib": timing.reserved_gib,
        "trainable_params": sum(p.numel() for p in params),
        "optimizer": type(optimizer).__name__ if optimizer is not None else None,
        "modules": n_modules,
        "fast_path_modules": fast,
        "loss": float(timing.loss.detach().float().cpu()),
        "steps": args.steps,
        "warmup_s": round(timing.warmup_s, 2),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        **({"top_kernels": top_kernels} if top_kernels is not None else {}),
        **mem,
    }


def _profile_kernels(step, sync, top: int = 60) -> list:
    """GPU time per kernel name over one step: [name, total ms, calls], the largest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        sync()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t > 0:
            rows.append([ev.key[:90], round(t / 1000.0, 3), ev.count])
    rows.sort(key=lambda r: -r[1])
    total = round(sum(r[1] for r in rows), 2)
    return [["TOTAL", total, sum(r[2] for r in rows)]] + rows[:top]


def run_child(variant: str, cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    """One variant's process: the dict it prints after "BENCH ", or {variant, error} (its output's tail)."""
    env = {**(env if env is not None else os.environ), "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "error": f"timed out after {timeout} s"}
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        return {"variant": variant, "error": (proc.stderr or proc.stdout)[-1200:]}
    return json.loads(line[len("BENCH ") :])


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.single:
        print("BENCH " + json.dumps(run_single(args)), flush=True)
        return []
    if args.mem_peak and args.device != "cuda":  # said before any variant's process starts
        raise SystemExit("--mem_peak: needs --device cuda (it reads the CUDA allocator's history)")
    results = []
    base_argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        cmd = [sys.executable, str(Path(__file__).resolve()), *base_argv, "--single", variant]
        result = run_child(variant, cmd, args.variant_timeout)
        results.append(result)
        print(json.dumps(result), flush=True)
    floors = {
        r["variant"].split(":")[0]: r["median_s"]
        for r in results
        if r["variant"].split(":")[0] in ("floor", "sd-floor", "anima-floor", "sdanima-floor")
        and "median_s" in r
    }
    for r in results:
        family = r["variant"].split("-")[0]
        floor = floors.get(
            {"sd": "sd-floor", "anima": "anima-floor", "sdanima": "sdanima-floor"}.get(family, "floor")
        )
        if floor and "median_s" in r:
            r["ratio_to_floor"] = r["median_s"] / floor
    print("SUMMARY " + json.dumps(results), flush=True)
    return results


if __name__ == "__main__":
    main()
