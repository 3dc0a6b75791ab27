"""Train a LoRA / LoHa / LoKr network on SDXL (drop-in for kohya-ss sd-scripts' sdxl_train_network.py).

    accelerate launch sdxl_train_network.py --pretrained_model_name_or_path sdxl.safetensors \
        --dataset_config data.toml --network_module networks.loha --output_dir out --output_name my-loha
"""

from __future__ import annotations

import argparse

from library.io.errors import run_cli
from library.sdxl.trainer import SdxlArchitecture
from library.training.loop import TrainResult, main_entry, training_parser


def setup_parser() -> argparse.ArgumentParser:
    return training_parser(SdxlArchitecture(), "SDXL network (LoRA/LoHa/LoKr) training")


def main(argv: list[str] | None = None) -> TrainResult | None:
    return main_entry(SdxlArchitecture(), setup_parser, argv)


if __name__ == "__main__":
    run_cli(main)
