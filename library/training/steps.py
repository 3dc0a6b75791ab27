"""Pieces of a training run that hold no run state: accelerate set-up, dtypes, the data order, RNG
snapshots, the NaN/Ctrl-C check, gradient sync, pruning old saves, sample prompts.

Data order is ours, not the DataLoader's: each epoch the batch indices are permuted by a generator
seeded with ``seed + epoch`` and dealt round-robin to processes, so a resumed run can skip exactly the
batches already seen and continue bit-identically (CPU, ``max_data_loader_n_workers 0``).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from library.training import saving


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    log_with = None
    project_dir = None
    if args.log_with:
        log_with = ["tensorboard", "wandb"] if args.log_with == "all" else [args.log_with]
        project_dir = os.path.join(args.logging_dir, (args.log_prefix or "") + time.strftime("%Y%m%d%H%M%S"))
    kwargs_handlers = []
    if args.ddp_timeout:
        import datetime

        from accelerate.utils import InitProcessGroupKwargs

        kwargs_handlers.append(InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=args.ddp_timeout)))
    # main() may run several times in one process (tests, the demo): forget the previous run's precision
    # and accumulation settings, but keep the process group (PartialState)
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(
        # without a GPU, accelerate only builds a (gloo) process group when told it runs on CPU
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=log_with,
        project_dir=project_dir,
        kwargs_handlers=kwargs_handlers,
    )


def dtypes(args: argparse.Namespace) -> tuple[torch.dtype, torch.dtype | None]:
    """(weight dtype of the frozen model, save dtype of the network or None = as trained)."""
    weight = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    save = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(
        args.save_precision or ""
    )
    return weight, save


def epoch_batches(n: int, epoch: int, seed: int, rank: int, world: int) -> list[int]:
    """Batch indices of one epoch for one process: a seeded permutation dealt round-robin, padded."""
    gen = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n, generator=gen).tolist()
    per_rank = math.ceil(n / world)
    order = order + order[: per_rank * world - n]  # every rank gets the same count (DDP lock-step)
    return order[rank::world]


def rng_snapshot() -> tuple[Any, Any, torch.Tensor]:
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def rng_restore(snap: tuple[Any, Any, torch.Tensor]) -> None:
    random.setstate(snap[0])
    np.random.set_state(snap[1])
    torch.set_rng_state(snap[2])


@dataclass
class TrainResult:
    final_path: Path | None  # None on non-main processes
    network: torch.nn.Module
    global_step: int
    losses: list[float]  # the loss of every micro-batch, in order (this process)


def read_prompts(args: argparse.Namespace) -> list[str]:
    if not args.sample_prompts:
        return []
    from library.inference.prompt_options import read_prompt_file

    return read_prompt_file(args.sample_prompts)


def read_step(
    loss: torch.Tensor, accelerator: Accelerator, step: int, epoch: int, last: Path | None, stop: bool
) -> tuple[float, bool]:
    """The step's one host read, made after its update is queued: the loss value, and whether any rank
    was asked to stop (Ctrl-C), so that all ranks stop after the same step.

    Reading earlier (between forward and backward) would make the host wait for the forward and leave the
    GPU idle while it queues the backward. NaN/Inf on any rank stops every rank with the step number. The
    update that followed it is in memory only: nothing is saved after this, and earlier saves stay
    untouched.
    """
    value = loss.detach().float().reshape(1)
    if accelerator.num_processes > 1:
        # torch.full launches a fill; torch.tensor(..., device=) would be a blocking upload
        flags = torch.cat([(~torch.isfinite(value)).float(), torch.full_like(value, float(stop))])
        value = torch.cat([value, accelerator.reduce(flags, "sum")])
    read = value.tolist()
    bad = not math.isfinite(read[0]) or (len(read) > 1 and read[1] > 0)
    if bad:
        where = f"the last good save is {last}" if last else "nothing was saved yet"
        raise FloatingPointError(f"loss is NaN/Inf at step {step} (epoch {epoch}); training stopped, {where}")
    return read[0], (read[2] > 0 if len(read) > 1 else stop)


def sync_grads(params: list[torch.nn.Parameter], world: int) -> None:
    """Mean all-reduce of the network gradients (the network is called through patched modules, not DDP)."""
    if world <= 1:
        return
    for p in params:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
            p.grad.div_(world)


def remove_old_epoch(args: argparse.Namespace, out: Path, ext: str, epoch_no: int, acc: Accelerator) -> None:
    if not acc.is_main_process or not args.save_every_n_epochs:
        return
    if args.save_last_n_epochs:
        old = epoch_no - args.save_every_n_epochs * args.save_last_n_epochs
        if old > 0:
            saving.remove_path(out / saving.model_file_name(args.output_name, ext, epoch=old))
    n_state = args.save_last_n_epochs_state or args.save_last_n_epochs
    if args.save_state and n_state:
        old = epoch_no - args.save_every_n_epochs * n_state
        if old > 0:
            saving.remove_path(out / saving.state_dir_name(args.output_name, epoch=old))


def remove_old_step(args: argparse.Namespace, out: Path, ext: str, step: int, acc: Accelerator) -> None:
    if not acc.is_main_process:
        return
    if args.save_last_n_steps:
        old = step - args.save_last_n_steps
        old = old - old % args.save_every_n_steps if old > 0 else old
        if old > 0:
            saving.remove_path(out / saving.model_file_name(args.output_name, ext, step=old))
    n_state = args.save_last_n_steps_state or args.save_last_n_steps
    if args.save_state and n_state:
        old = step - n_state
        old = old - old % args.save_every_n_steps if old > 0 else old
        if old > 0:
            saving.remove_path(out / saving.state_dir_name(args.output_name, step=old))
