"""Offline demo: train a LoHa on a tiny SDXL-architecture model, end to end, in about a minute on CPU.

    python demo_tiny_loha.py --output_dir demo_out

1. builds a tiny SDXL (real module tree and key layout, small widths) from config and writes it as a
   single-file SGM checkpoint (``model.diffusion_model.*``, ``conditioner.embedders.*``, ...);
2. draws a small dataset (PNG images + ``.txt`` captions) and writes an sd-scripts dataset TOML and a
   sample-prompt file;
3. runs the real trainer entry, ``sdxl_train_network.main([...])``, with the same flags a user passes to
   ``accelerate launch sdxl_train_network.py`` (``--network_module networks.loha``);
4. prints where the trained ``.safetensors`` and the sample PNGs are.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40)}


def write_dataset(folder: Path, size: int = 64) -> Path:
    """Eight images of coloured shapes with captions; returns the dataset TOML path."""
    from PIL import Image, ImageDraw

    img_dir = folder / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    for i, (name, rgb) in enumerate(COLOURS.items()):
        for j, shape in enumerate(("circle", "square")):
            img = Image.new("RGB", (size, size), (240, 240, 235))
            draw = ImageDraw.Draw(img)
            box = (size // 6 + 2 * i, size // 6 + 2 * j, size * 5 // 6, size * 5 // 6)
            (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=rgb)
            stem = f"{name}_{shape}"
            img.save(img_dir / f"{stem}.png")
            (img_dir / f"{stem}.txt").write_text(f"sks toy, a {name} {shape}", encoding="utf-8")
    toml_path = folder / "dataset.toml"
    toml_path.write_text(
        "[general]\n"
        f"resolution = {size}\n"
        'caption_extension = ".txt"\n'
        "shuffle_caption = false\n\n"
        "[[datasets]]\n"
        "batch_size = 2\n\n"
        "[[datasets.subsets]]\n"
        f"image_dir = '{img_dir.as_posix()}'\n"
        "num_repeats = 1\n",
        encoding="utf-8",
    )
    return toml_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="demo_out", help="where everything is written")
    parser.add_argument("--max_train_steps", type=int, default=32)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--tokenizer_cache_dir",
        default=None,
        help="folder holding a CLIP tokenizer (default: the tokenizer bundled with the package)",
    )
    opts = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))

    import torch

    from library.sdxl.loading import build_tiny_sdxl_models, save_sdxl_single_file

    # a tiny model gains nothing from intra-op threads, and spinning OpenMP threads on a busy 2-core
    # machine make each step ~10x slower; sd-scripts' docs likewise use --num_cpu_threads_per_process 1
    torch.set_num_threads(1)
    start = time.time()
    out = Path(opts.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = opts.tokenizer_cache_dir

    print(f"[1/3] building a tiny SDXL and writing {out / 'tiny_sdxl.safetensors'}")
    models = build_tiny_sdxl_models(tok_dir, seed=0)
    ckpt = out / "tiny_sdxl.safetensors"
    save_sdxl_single_file(models, ckpt)
    del models

    print("[2/3] writing a small dataset, its TOML and sample prompts")
    toml_path = write_dataset(out / "dataset")
    prompts = out / "prompts.txt"
    prompts.write_text(
        "# one image per line; sd-scripts prompt options\n"
        "sks toy, a red circle --n blurry --w 64 --h 64 --d 1234 --s 12 --l 5\n",
        encoding="utf-8",
    )

    print(f"[3/3] training a LoHa for {opts.max_train_steps} steps")
    import sdxl_train_network

    train_argv = [
        "--pretrained_model_name_or_path", str(ckpt),
        "--dataset_config", str(toml_path),
        "--network_module", "networks.loha", "--network_dim", "8", "--network_alpha", "4",
        "--optimizer_type", "AdamW", "--learning_rate", "2e-3",
        "--lr_scheduler", "cosine", "--lr_warmup_steps", "4",
        "--max_train_steps", str(opts.max_train_steps),
        "--cache_latents", "--max_data_loader_n_workers", "0",
        "--sample_prompts", str(prompts), "--sample_every_n_steps", str(opts.max_train_steps),
        "--sample_sampler", "euler_a",
        "--seed", str(opts.seed), "--output_dir", str(out), "--output_name", "tiny-loha",
        "--logging_dir", str(out / "logs"),
    ]  # fmt: skip
    if tok_dir:
        train_argv += ["--tokenizer_cache_dir", tok_dir]
    result = sdxl_train_network.main(train_argv)
    samples = sorted((out / "sample").glob("*.png"))
    print(f"\ndone in {time.time() - start:.0f} s")
    print(f"  LoHa weights : {result.final_path}")
    for s in samples:
        print(f"  sample image : {s}")
    print(f"  TensorBoard  : tensorboard --logdir {out / 'logs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
