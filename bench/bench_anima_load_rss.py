"""Peak host memory (RSS) of loading the Anima models the way anima_train_network.py does.

Runs the trainer's own hooks in this fresh process: `load_models`, the moves `cache` makes for
--cache_latents / --cache_text_encoder_outputs (without a dataset), `load_after_cache` (the DiT) and
`prepare_models`; prints the peak RSS (ru_maxrss) after each phase as one JSON line. Real-size files come
from bench/e2e_setup.py:

    python -c "import sys; sys.path[:0] = ['.', 'bench']; from pathlib import Path; from e2e_setup import write_anima; write_anima(Path('/tmp/anima_real'), 'real', 'cpu')"
    python bench/bench_anima_load_rss.py --folder /tmp/anima_real [--no_fp8] [--meta_device] [--sample]

The flags are the seed's: --mixed_precision bf16 --fp8_base --gradient_checkpointing --cache_latents
--cache_text_encoder_outputs --network_train_unet_only (the device is accelerate's: CUDA when present).
Qwen3 and the VAE go where the trainer puts them after caching: released (meta) without sample prompts,
back to the host with --sample. The last phase, `give_back`, is what the trainer does before its first step
(library/io/host_memory.py): the RSS "now" there is what the training steps start from.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.io.host_memory import give_back_host_memory, resident_bytes  # noqa: E402


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _current_mib() -> float:
    rss = resident_bytes()
    return float("nan") if rss is None else rss / 2**20


def _mib_by_device(model) -> dict[str, float]:
    out: dict[str, float] = {}
    for t in [*model.parameters(), *model.buffers()]:
        out[str(t.device)] = out.get(str(t.device), 0.0) + t.nbytes / 2**20
    return {k: round(v, 1) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--folder", type=Path, required=True, help="folder written by write_anima(folder, ...)")
    p.add_argument("--no_fp8", action="store_true", help="leave --fp8_base out")
    p.add_argument("--meta_device", action="store_true",
                   help="the meta device stands in for the GPU (no CUDA here): what the host keeps when the "
                        "DiT goes to the device; the moves to the device are skipped (meta holds no values)")  # fmt: skip
    p.add_argument("--sample", action="store_true",
                   help="pass --sample_prompts: Qwen3 and the VAE wait on the host for sampling")  # fmt: skip
    a = p.parse_args()
    import torch

    from anima_train_network import build_parser
    from library.anima.trainer import AnimaArchitecture
    from library.training.architecture import RunContext
    from library.training.steps import dtypes, make_accelerator

    f = a.folder
    argv = ["--pretrained_model_name_or_path", str(f / "anima_dit_tiny.safetensors"), "--qwen3",
            str(f / "qwen3_tiny"), "--vae", str(f / "qwen_image_vae_tiny.safetensors"), "--output_dir",
            "/tmp/unused", "--mixed_precision", "bf16", "--gradient_checkpointing", "--cache_latents",
            "--cache_text_encoder_outputs", "--network_train_unet_only", "--network_module", "networks.lokr"]  # fmt: skip
    argv += [] if a.no_fp8 else ["--fp8_base"]
    if a.sample:
        prompts = Path(tempfile.mkdtemp()) / "prompts.txt"
        prompts.write_text("a cat --w 1024 --h 1024\n")
        argv += ["--sample_prompts", str(prompts)]
    args = build_parser().parse_args(argv)
    arch = AnimaArchitecture()
    arch.verify_args(args)
    acc = SimpleNamespace(device=torch.device("meta")) if a.meta_device else make_accelerator(args)
    weight_dtype, _ = dtypes(args)
    ctx = RunContext(args, acc, weight_dtype, train_unet=True, train_text_encoder=False)
    phases: dict[str, dict[str, float]] = {"start": {"peak": _peak_mib(), "now": _current_mib()}}
    t0 = time.perf_counter()
    arch.load_models(ctx)
    phases["load_models"] = {"peak": _peak_mib(), "now": _current_mib(), "s": time.perf_counter() - t0}
    m = arch.models
    park = arch._after_cache_device(args)  # what cache() does around the latent and text-encoder caching
    if not a.meta_device:
        m.vae.to(ctx.device)
    m.vae.to(park)
    if not a.meta_device:
        m.text_encoder.to(ctx.device, weight_dtype)
    m.text_encoder.to(park)
    arch.text_cached = True
    phases["cache_moves"] = {"peak": _peak_mib(), "now": _current_mib()}
    arch.load_after_cache(ctx)  # the DiT, streamed onto the device once caching is done
    phases["load_dit"] = {"peak": _peak_mib(), "now": _current_mib(), "s": time.perf_counter() - t0}
    arch.prepare_models(ctx)
    phases["prepare_models"] = {"peak": _peak_mib(), "now": _current_mib(), "s": time.perf_counter() - t0}
    give_back_host_memory("before the first step")
    phases["give_back"] = {"peak": _peak_mib(), "now": _current_mib(), "s": time.perf_counter() - t0}
    info = {
        "device": str(ctx.device),
        "fp8_base": not a.no_fp8,
        "sample_prompts": a.sample,
        "dit_dtypes": sorted({str(t.dtype) for t in m.dit.state_dict().values()}),
        "model_mib": {  # the tensors each model keeps, by device: what a CUDA run does not hold on the host
            name: _mib_by_device(model)
            for name, model in (("dit", m.dit), ("text_encoder", m.text_encoder), ("vae", m.vae))
        },
        "phases_mib": {k: {n: round(v, 1) for n, v in d.items()} for k, d in phases.items()},
        "peak_rss_mib": round(_peak_mib(), 1),
        "torch": torch.__version__,
    }
    print(json.dumps(info))


if __name__ == "__main__":
    main()
