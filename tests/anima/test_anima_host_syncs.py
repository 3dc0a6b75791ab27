"""The Anima training step reads the host once, after its update is queued (tests/helpers/host_syncs.py;
the SDXL twin is tests/training/test_host_syncs.py)."""

from __future__ import annotations

import numpy as np
from PIL import Image

import anima_train_network as trainer
from library.anima.loading import build_tiny_anima_models, save_tiny_anima_files
from library.training.run import TrainingRun
from tests.helpers.host_syncs import probe_steps


def test_anima_step_reads_the_host_once_after_its_update(tmp_path, tokenizers_dir):
    files = save_tiny_anima_files(build_tiny_anima_models(tokenizers_dir, seed=0), tmp_path / "models")
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    for i in range(2):
        Image.fromarray(np.full((64, 64, 3), 60 + 90 * i, np.uint8)).save(img_dir / f"{i}.png")
        (img_dir / f"{i}.txt").write_text(f"a flat colour {i}")
    toml = tmp_path / "data.toml"
    toml.write_text(
        '[general]\nresolution = 64\nenable_bucket = false\ncaption_extension = ".txt"\n'
        f'[[datasets]]\nbatch_size = 2\n[[datasets.subsets]]\nimage_dir = "{img_dir}"\n'
    )
    argv = [
        "--pretrained_model_name_or_path", str(files["dit"]), "--qwen3", str(files["text_encoder"]),
        "--t5_tokenizer_path", str(files["t5_tokenizer"]), "--vae", str(files["vae"]),
        "--dataset_config", str(toml), "--network_module", "networks.lokr", "--network_dim", "4",
        "--network_alpha", "2", "--optimizer_type", "AdamW", "--max_train_steps", "3",
        "--output_dir", str(tmp_path / "out"), "--output_name", "net", "--mixed_precision", "no",
        "--qwen3_max_token_length", "16", "--t5_max_token_length", "16", "--seed", "3",
        "--gradient_checkpointing", "--cache_latents", "--cache_text_encoder_outputs", "--network_train_unet_only",
        "--loss_type", "huber", "--max_grad_norm", "1.0",
    ]  # fmt: skip
    with probe_steps(TrainingRun, "train_step", lambda run: run.unet) as syncs:
        trainer.main(argv)
    after = [[(call, site.rsplit(":", 1)[0]) for call, site in step] for step in syncs.after_forward()]
    assert after == [[("tolist", "library/training/steps.py")]] * 3
