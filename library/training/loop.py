"""The network trainer's entry points shared by the SDXL and Anima scripts: parse, train, report.

Everything model-specific lives in a :class:`TrainingArchitecture` (load models, build the dataset,
cache, compute the per-sample loss, generate sample images, metadata names). The run itself, phase by
phase (accelerate, network contract, optimizer, saves, samples, resume), is `library.training.run`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from library.io.console import setup_logging
from library.io.errors import TrainingInterrupted, resume_command
from library.training.architecture import (
    DatasetInfo,
    RunContext,
    SampleRequest,
    TrainingArchitecture,
)
from library.training.run import TrainingRun
from library.training.steps import TrainResult
from library.training.stop_request import StopRequest

logger = logging.getLogger(__name__)

__all__ = ["DatasetInfo", "RunContext", "SampleRequest", "TrainResult", "TrainingArchitecture", "train"]


def train(args: argparse.Namespace, arch: TrainingArchitecture) -> TrainResult | None:
    """Run training. Bad input fails before any file is written; an output dir created by this run
    is removed again when it fails before writing anything."""
    out = Path(args.output_dir)
    created = not out.exists()
    stop = StopRequest()
    stop.install()
    try:
        return _train(args, arch, stop)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    finally:
        stop.restore()


def _train(args: argparse.Namespace, arch: TrainingArchitecture, stop: StopRequest) -> TrainResult | None:
    return TrainingRun(args, arch, stop).execute()


def training_parser(arch: TrainingArchitecture, description: str) -> argparse.ArgumentParser:
    """The trainer's command line: architecture flags, then the dataset and shared training flags."""
    from library.data.config import add_dataset_arguments
    from library.training.args import add_training_arguments

    parser = argparse.ArgumentParser(description=description)
    arch.add_arguments(parser)
    add_dataset_arguments(parser, text_encoder_caching=True)
    add_training_arguments(parser)
    return parser


def main_entry(arch: TrainingArchitecture, build_parser: Any, argv: list[str] | None) -> TrainResult | None:
    """Thin-script helper: parse, handle --output_config, train; errors print one clear line."""
    from library.training.args import parse_args, write_config_file

    setup_logging()
    parser = build_parser()
    args = parse_args(parser, argv)
    if args.output_config:
        path = write_config_file(parser, args)
        print(f"wrote {path}", file=sys.stderr)
        return None
    arch.verify_args(args)
    try:
        return train(args, arch)
    except TrainingInterrupted as e:
        e.command = resume_command(f"accelerate launch {arch.script}", sys.argv[1:] if argv is None else argv,
                                   e.state_dir)  # fmt: skip
        raise
