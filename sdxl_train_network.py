"""Train a LoRA / LoHa / LoKr network on SDXL (drop-in for kohya-ss sd-scripts' sdxl_train_network.py).

    accelerate launch sdxl_train_network.py --pretrained_model_name_or_path sdxl.safetensors \
        --dataset_config data.toml --network_module networks.loha --output_dir out --output_name my-loha
"""

from __future__ import annotations

import argparse
import sys

from library.dataset.config import add_dataset_arguments
from library.sdxl_training import SdxlArchitecture
from library.train_args import add_training_arguments
from library.train_loop import TrainResult, main_entry


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="SDXL network (LoRA/LoHa/LoKr) training")
    add_dataset_arguments(parser, text_encoder_caching=True)
    add_training_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> TrainResult | None:
    return main_entry(SdxlArchitecture(), setup_parser, argv)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, PermissionError, ImportError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
