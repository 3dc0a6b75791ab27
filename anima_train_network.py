"""Train a LoRA / LoHa / LoKr network for Anima (sd-scripts `anima_train_network.py` flags).

    accelerate launch anima_train_network.py --pretrained_model_name_or_path anima.safetensors \
        --qwen3 qwen3_06b --vae qwen_image_vae.safetensors --dataset_config data.toml \
        --network_module networks.lokr --network_dim 32 --network_alpha 16 --output_dir out

The loop is the one shared with the SDXL trainer (library/training/loop.py); the Anima part is
library/anima/trainer.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.anima.trainer import AnimaArchitecture  # noqa: E402
from library.io.errors import run_cli  # noqa: E402
from library.training.loop import main_entry, training_parser  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    return training_parser(AnimaArchitecture(), "Anima LoRA/LoHa/LoKr network training")


def main(argv: list[str] | None = None) -> Path | None:
    """Train; returns the final network file (None on non-main processes or with --output_config)."""
    result = main_entry(AnimaArchitecture(), build_parser, argv)
    return getattr(result, "final_path", result)


if __name__ == "__main__":
    run_cli(main)
