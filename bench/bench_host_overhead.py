"""Host (CPU) cost of one adapted-layer call, forward + backward: ours vs kohya-ss sd-scripts' modules.

Why tiny CPU tensors measure host overhead: an SDXL eager step is host-bound (the GPU waits on Python), so
what an adapter costs there is the Python, dispatcher and autograd work per call, not FLOPs. On the CPU with a
64→64 Linear or a 16→16 3×3 conv, batch 1 and rank 4, every kernel finishes in about a microsecond, so the
wall time of a call is that same per-call host work (the Python of the module, each op's dispatch, autograd
node creation and the engine's backward walk), minus only the CUDA launch latency that a GPU adds per kernel.

Setting as in the SDXL trainer: the frozen base in bf16 (or fp8 as `--fp8_base` stores it: our layers upcast
in their own forward, sd-scripts' rely on autocast casting the fp8 weight), bf16 activations that need grad,
fp32 factors, bf16 autocast around the forward, backward outside it. Our modules take the path SDXL takes in
eager at every Linear (the fused rebuild node; `use_factored = False`, as the cost model picks at SDXL sizes).
`ckpt` wraps each call in torch.utils.checkpoint (non-reentrant, as diffusers' gradient checkpointing does):
forward, recompute and backward, i.e. the whole per-step cost of one module; `plain` is forward + backward.

Each row: the median µs of all `--repeats` × `--calls` calls (each timed alone; the median shrugs off the
bursts a shared host adds to some calls), variants interleaved in blocks of `--calls` (drift hits all alike), the same for the unadapted layer (`bare`), and the adapter's own
cost (`extra_us` = the row minus bare). `digest` hashes the output and every grad of the first call, so two
versions of the code can be compared bit for bit (same seed, same digest).

    python bench/bench_host_overhead.py [--sd_scripts_path baselines/sd-scripts] [--calls 200 --repeats 10]

sd-scripts' files are executed by path under a private package name; the imports that only their
network builders use (its network_base, library.utils' logging set-up, its U-Net class) get stand-ins while
they load, and are removed afterwards (this process imports our own `networks` and `library`).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib.util
import json
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from networks import fp8  # noqa: E402
from networks.loha import LoHaModule  # noqa: E402
from networks.lokr import LoKrModule  # noqa: E402
from networks.lora import LoRAModule  # noqa: E402
from networks.modules.adapter import attach_adapter  # noqa: E402
from networks.network_args import NetworkArgs  # noqa: E402

ALGOS = ("lora", "loha", "lokr")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SD_CLASSES = {"lora": "LoRAModule", "loha": "LoHaModule", "lokr": "LoKrModule"}


def load_sd_scripts(root: Path) -> dict[str, type]:
    """sd-scripts' LoRA / LoHa / LoKr module classes, loaded from `root`/networks by path."""
    pkg_name = "_sd_scripts_networks"
    pkg = types.ModuleType(pkg_name)
    pkg.__path__ = [str(root / "networks")]

    def stand_in(name: str) -> types.ModuleType:
        def attribute(attr: str) -> object:
            if attr.startswith("__"):  # module protocol look-ups (inspect walks sys.modules)
                raise AttributeError(attr)
            return (lambda *a, **k: None) if attr == "setup_logging" else object

        mod = types.ModuleType(name)
        mod.__getattr__ = attribute  # type: ignore[attr-defined]
        return mod

    stubs = {
        pkg_name: pkg,
        f"{pkg_name}.network_base": stand_in(f"{pkg_name}.network_base"),
        "library.utils": stand_in("library.utils"),
        "library.sdxl_original_unet": stand_in("library.sdxl_original_unet"),
    }
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    classes = {}
    try:
        for algo in ALGOS:
            name = f"{pkg_name}.{algo}"
            spec = importlib.util.spec_from_file_location(name, root / "networks" / f"{algo}.py")
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
            classes[algo] = getattr(mod, SD_CLASSES[algo])
    finally:
        for k, v in saved.items():
            if k.startswith("library."):
                if v is None:
                    sys.modules.pop(k, None)
                else:
                    sys.modules[k] = v
    return classes


def make_layer(kind: str, base: str, sd_style: bool, dtype: torch.dtype) -> nn.Module:
    """The frozen base layer, same values for every variant (seeded). fp8: ours converts the weight the way
    `--fp8_base` does (bias kept, fp32 as the trainer leaves it); sd-scripts casts the whole layer to fp8."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 64) if kind == "linear" else nn.Conv2d(16, 16, 3, padding=1)
    layer.requires_grad_(False)
    if base == "16bit":
        return layer.to(dtype)
    if sd_style:
        return layer.to(fp8.FP8_DTYPE)
    w8, scale = fp8.quantize(layer.weight, scaled=False)
    fp8.set_fp8_weight(layer, w8, scale)
    return layer


def _nonzero_(params: list[nn.Parameter]) -> None:
    """Fill the factors with seeded values (a branch that is not zero, as after some steps)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn_like(p) * 0.1)


def ours(algo: str, layer: nn.Module, rank: int, alpha: float) -> list[nn.Parameter]:
    if algo == "lora":
        m = LoRAModule("lora_unet_l", layer, 1.0, rank, alpha)
    elif algo == "loha":
        m = LoHaModule("lora_unet_l", layer, 1.0, rank, alpha)
    else:
        m = LoKrModule.create("lora_unet_l", layer, 1.0, rank, alpha, NetworkArgs(algo="lokr"))
    m.use_factored = False  # the rebuild, as the cost model picks at every SDXL layer in eager
    attach_adapter(layer, m)
    m.train()
    params = [p for _, p in sorted(m.named_parameters())]
    _nonzero_(params)
    return params


def theirs(cls: type, layer: nn.Module, rank: int, alpha: float) -> list[nn.Parameter]:
    m = cls("lora_unet_l", layer, 1.0, rank, alpha)
    m.apply_to()
    m.train()
    params = [p for _, p in sorted(m.named_parameters()) if p.requires_grad]
    _nonzero_(params)
    return params


def digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(t.dtype).encode())
        h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def make_call(
    layer: nn.Module, params: list[nn.Parameter], kind: str, ckpt: bool, dtype: torch.dtype
) -> tuple[Callable[[], list], list[torch.Tensor]]:
    """One forward + backward of the layer (recompute included under `ckpt`), returning [y, grad x, grads];
    and the tensors whose grads the caller resets between calls (as zero_grad(set_to_none) does per step)."""
    torch.manual_seed(2)
    shape = (1, 8, 64) if kind == "linear" else (1, 16, 8, 8)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    gy = torch.randn(shape, dtype=dtype)
    autocast = dtype != torch.float32
    fwd = layer if not ckpt else (lambda t: checkpoint(layer, t, use_reentrant=False))

    def call() -> list:
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            y = fwd(x)
        y.backward(gy)
        return [y, x.grad, *[p.grad for p in params]]

    return call, [x, *params]


def build(args: argparse.Namespace, kind: str, base: str, ckpt: bool, sd: dict[str, type]) -> dict:
    dtype = DTYPES[args.dtype]
    """name -> (call, the tensors whose grads are reset between calls)."""
    variants: dict[str, tuple[Callable, list[torch.Tensor]]] = {}
    entries: list[tuple[str, Callable[[nn.Module], list], bool]] = [("bare", lambda lay: [], False)]
    if (
        sd and base == "fp8"
    ):  # sd-scripts' fp8 layer is a different base: the whole layer in fp8, autocast upcasts
        entries.append(("sd-bare", lambda lay: [], True))
    entries += [(f"ours-{a}", lambda lay, a=a: ours(a, lay, args.rank, args.alpha), False) for a in ALGOS]
    entries += [(f"sd-{a}", lambda lay, a=a: theirs(sd[a], lay, args.rank, args.alpha), True) for a in sd]
    for name, attach, sd_style in entries:
        layer = make_layer(kind, base, sd_style, dtype)
        params = attach(layer)
        variants[name] = make_call(layer, params, kind, ckpt, dtype)
    return variants


def time_case(variants: dict, args: argparse.Namespace) -> dict[str, dict]:
    """Per-call seconds of every variant ({"samples": {name: [...]}}) and each one's first-call digest."""
    samples: dict[str, list[float]] = {n: [] for n in variants}
    digests = {}
    for name, (call, holders) in variants.items():  # the digest of a first call, then warm-up
        digests[name] = digest([t for t in call() if t is not None])
        for _ in range(args.warmup):
            for t in holders:
                t.grad = None
            call()
    timer = time.perf_counter
    for _ in range(args.repeats):
        for name, (call, holders) in variants.items():
            gc.collect()
            block = samples[name]
            for _ in range(args.calls):
                for t in holders:
                    t.grad = None
                t0 = timer()
                call()
                block.append(timer() - t0)
    return {"samples": samples, "digests": digests}


def run(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(1)
    sd = load_sd_scripts(Path(args.sd_scripts_path)) if args.sd_scripts_path else {}
    rows = []
    for kind in args.layers:
        for base in args.bases:
            for mode in args.modes:
                variants = build(args, kind, base, mode == "ckpt", sd)
                res = time_case(variants, args)
                # the median call: robust to the bursts a shared host adds to some calls
                medians = {name: statistics.median(s) * 1e6 for name, s in res["samples"].items()}
                for name, s in res["samples"].items():
                    bare = medians["sd-bare" if name.startswith("sd-") and "sd-bare" in medians else "bare"]
                    deciles = statistics.quantiles(s, n=10)
                    row = {
                        "layer": kind,
                        "base": args.dtype if base == "16bit" else base,
                        "mode": mode,
                        "variant": name,
                        "us_per_call": round(medians[name], 1),
                        "extra_us": round(medians[name] - bare, 1),
                        "p10_p90_us": [round(deciles[0] * 1e6, 1), round(deciles[-1] * 1e6, 1)],
                        "digest": res["digests"][name],
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sd_scripts_path", default=None, help="kohya-ss/sd-scripts checkout: adds its modules")
    p.add_argument("--layers", nargs="+", default=["linear", "conv"], choices=["linear", "conv"])
    p.add_argument(
        "--bases",
        nargs="+",
        default=["16bit", "fp8"],
        choices=["16bit", "fp8"],
        help="16bit: the base in --dtype; fp8: stored as float8_e4m3fn (--fp8_base)",
    )
    p.add_argument(
        "--dtype",
        default="bf16",
        choices=sorted(DTYPES),
        help="compute dtype: bf16 under autocast (the trainer's); fp32 without autocast, where the "
        "CPU's kernels are cheapest and the host's own work shows most plainly",
    )
    p.add_argument("--modes", nargs="+", default=["plain", "ckpt"], choices=["plain", "ckpt"])
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--alpha", type=float, default=2.0, help="≠ rank, so s ≠ 1 is applied")
    p.add_argument("--calls", type=int, default=200, help="calls per timed block")
    p.add_argument("--repeats", type=int, default=10, help="timed blocks per variant, interleaved")
    p.add_argument("--warmup", type=int, default=20)
    args = p.parse_args(argv)
    if args.dtype == "fp32" and "fp8" in args.bases:
        p.error(
            "--bases fp8 needs --dtype bf16 (an fp8 base is upcast to the autocast dtype, as the trainer needs)"
        )
    return run(args)


if __name__ == "__main__":
    main()
