"""GPU smoke run of both trainers on tiny models: the code paths CPU CI cannot reach.

SDXL: LoHa with bf16 mixed precision, gradient checkpointing and `--torch_compile` (inductor), then the
same eager, and the two loss curves compared. Anima: LoKr with bf16 and `--blocks_to_swap 1`. Prints one
JSON line per run. Needs a CUDA device; tokenizers are the package's bundled ones.

    python bench/gpu_smoke_trainers.py --out_dir /tmp/gpu_smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def _sdxl(out: Path, compile_: bool) -> dict:
    import demo_tiny_loha
    import sdxl_train_network
    from library.sdxl.loading import build_tiny_sdxl_models, save_sdxl_single_file

    ckpt = out / "tiny_sdxl.safetensors"
    if not ckpt.exists():
        save_sdxl_single_file(build_tiny_sdxl_models(seed=0), ckpt)
    toml_path = demo_tiny_loha.write_dataset(out / "sdxl_data")
    name = "compiled" if compile_ else "eager"
    argv = [
        "--pretrained_model_name_or_path", str(ckpt), "--dataset_config", str(toml_path),
        "--network_module", "networks.loha", "--network_dim", "8", "--network_alpha", "4",
        "--optimizer_type", "AdamW", "--learning_rate", "1e-3", "--max_train_steps", "8",
        "--mixed_precision", "bf16", "--gradient_checkpointing", "--cache_latents",
        "--max_data_loader_n_workers", "0", "--seed", "1",
        "--output_dir", str(out / f"sdxl_{name}"), "--output_name", "loha",
    ]  # fmt: skip
    if compile_:
        argv.append("--torch_compile")
    t0 = time.perf_counter()
    result = sdxl_train_network.main(argv)
    return {"run": f"sdxl-loha-{name}", "seconds": time.perf_counter() - t0, "losses": result.losses}


def _anima(out: Path) -> dict:
    import anima_train_network
    from library.anima.loading import build_tiny_anima_models, save_tiny_anima_files
    from library.anima.model import Anima, tiny_anima_config

    models = build_tiny_anima_models(seed=0)
    cfg = tiny_anima_config()
    cfg.num_blocks = 4  # block swap keeps two blocks on the device and needs at least three
    models.dit = Anima(cfg).eval().requires_grad_(False)
    files = save_tiny_anima_files(models, out / "anima_models")
    import demo_tiny_loha

    toml_path = demo_tiny_loha.write_dataset(out / "anima_data")
    argv = [
        "--pretrained_model_name_or_path", str(files["dit"]), "--qwen3", str(files["text_encoder"]),
        "--t5_tokenizer_path", str(files["t5_tokenizer"]), "--vae", str(files["vae"]),
        "--dataset_config", str(toml_path), "--network_module", "networks.lokr",
        "--network_dim", "4", "--network_alpha", "2", "--optimizer_type", "AdamW", "--learning_rate", "1e-3",
        "--max_train_steps", "6", "--mixed_precision", "bf16", "--gradient_checkpointing",
        "--blocks_to_swap", "1", "--max_data_loader_n_workers", "0", "--seed", "1",
        "--qwen3_max_token_length", "16", "--t5_max_token_length", "16",
        "--output_dir", str(out / "anima"), "--output_name", "lokr",
    ]  # fmt: skip
    t0 = time.perf_counter()
    from library.anima.trainer import AnimaArchitecture
    from library.training.loop import main_entry

    result = main_entry(AnimaArchitecture(), anima_train_network.build_parser, argv)
    return {"run": "anima-lokr-blockswap", "seconds": time.perf_counter() - t0, "losses": result.losses}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out_dir", default="/tmp/gpu_smoke")
    p.add_argument("--anima_only", action="store_true")
    a = p.parse_args()
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    jobs = [lambda: _sdxl(out, False), lambda: _sdxl(out, True), lambda: _anima(out)]
    for fn in jobs[2:] if a.anima_only else jobs:
        try:
            runs.append(fn())
        except Exception as e:  # report every run, even after a failure
            runs.append({"run": "failed", "error": f"{type(e).__name__}: {e}"})
        print("SMOKE " + json.dumps(runs[-1]), flush=True)
    eager, comp = (r.get("losses") for r in runs[:2])
    if eager and comp:
        worst = max(abs(x - y) / max(abs(x), 1e-8) for x, y in zip(eager, comp))
        print("SMOKE " + json.dumps({"compiled_vs_eager_max_rel_loss_diff": worst}), flush=True)
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
