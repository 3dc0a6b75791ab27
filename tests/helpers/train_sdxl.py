"""The tiny SDXL training set-up shared by the trainer tests: a single-file checkpoint, a 4-image dataset,
the command line, and TensorBoard scalars."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from library.sdxl.loading import build_tiny_sdxl_models, save_sdxl_single_file

N_IMAGES = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, clip_tokenizer_dir):
    """A tiny SDXL single-file checkpoint (real key layout) and a 4-image DreamBooth dataset TOML."""
    root = tmp_path_factory.mktemp("tiny_sdxl")
    models = build_tiny_sdxl_models(clip_tokenizer_dir, seed=0)
    ckpt = root / "tiny_sdxl.safetensors"
    save_sdxl_single_file(models, ckpt)
    img_dir = root / "img"
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        # smooth colour fields: a learnable signal, unlike white noise
        base = rng.random(3) * 255
        ramp = np.linspace(0, 1, 64)[None, :, None] * (rng.random(3) * 120)
        arr = np.clip(base + ramp + np.zeros((64, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(img_dir / f"{i}.png")
        (img_dir / f"{i}.txt").write_text(f"a photo of sks thing{i}")
    toml_path = root / "data.toml"
    toml_path.write_text(
        f'[general]\nresolution = 64\ncaption_extension = ".txt"\n'
        f"[[datasets]]\nbatch_size = {N_IMAGES}\n[[datasets.subsets]]\nimage_dir = '{img_dir}'\n"
    )
    return {"root": root, "ckpt": ckpt, "toml": toml_path, "img_dir": img_dir, "tok": clip_tokenizer_dir}


def _argv(tiny, out: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(tiny["ckpt"]), "--tokenizer_cache_dir", str(tiny["tok"]),
        "--dataset_config", str(tiny["toml"]), "--output_dir", str(out), "--output_name", "net",
        "--max_data_loader_n_workers", "0", "--seed", "42", *extra,
    ]  # fmt: skip


def _tb_scalars(logdir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for ev_file in logdir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(ev_file.parent))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            out.update({e.step: e.value for e in acc.Scalars(tag)})
    return out
