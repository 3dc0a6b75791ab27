"""The network training loop shared by the SDXL and Anima trainers.

Everything model-specific lives in a :class:`TrainingArchitecture` (load models, build the dataset,
cache, compute the per-sample loss, generate sample images, metadata names). This module owns the
sd-scripts network contract (spec sdxl.md §1 call order), accelerate, the optimizer/scheduler, the
schedule of saves/samples/states, logging and resume.

Data order is ours, not the DataLoader's: each epoch the batch indices are permuted by a generator
seeded with ``seed + epoch`` and dealt round-robin to processes, so a resumed run can skip exactly the
batches already seen and continue bit-identically (CPU, ``max_data_loader_n_workers 0``).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from tqdm import tqdm

from library.io.console import setup_logging
from library.io.errors import InputError, TrainingInterrupted, resume_command
from library.training import saving
from library.training.architecture import (
    DatasetInfo,
    RunContext,
    SampleRequest,
    TrainingArchitecture,
    compile_repeated_blocks,
)
from library.training.cuda_graph import enable_cuda_graph_training, host_side_dropout
from library.training.optimizers import build_optimizer, build_scheduler
from library.training.state import check_resume_folder, load_resume_state, run_settings, save_training_state
from library.training.stop_request import StopRequest
from library.training.utils import (
    LossRecorder,
    import_network_module,
    lr_log_names,
    parse_network_args,
    sample_file_name,
)

logger = logging.getLogger(__name__)

__all__ = ["DatasetInfo", "RunContext", "SampleRequest", "TrainResult", "TrainingArchitecture", "train"]


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


def _rng_snapshot() -> tuple[Any, Any, torch.Tensor]:
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _rng_restore(snap: tuple[Any, Any, torch.Tensor]) -> None:
    random.setstate(snap[0])
    np.random.set_state(snap[1])
    torch.set_rng_state(snap[2])


@dataclass
class TrainResult:
    final_path: Path | None  # None on non-main processes
    network: torch.nn.Module
    global_step: int
    losses: list[float]  # the loss of every micro-batch, in order (this process)


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
    session_id = random.randint(0, 2**32 - 1)
    training_started_at = time.time()
    output_dir = saving.check_output_dir_writable(args.output_dir)  # fail before any heavy work
    if args.resume:
        check_resume_folder(args)  # a state that cannot fit this run is named before any model loads
    if args.seed is None:
        args.seed = random.randint(0, 2**32 - 1)
    set_seed(args.seed)
    network_module = import_network_module(args.network_module)

    accelerator = make_accelerator(args)
    logger.info("accelerate: %d process(es), %s, device %s, mixed precision %s", accelerator.num_processes,
                accelerator.distributed_type, accelerator.device, accelerator.mixed_precision)  # fmt: skip
    weight_dtype, save_dtype = dtypes(args)
    ctx = RunContext(args, accelerator, weight_dtype, train_unet=not args.network_train_text_encoder_only,
                     train_text_encoder=not args.network_train_unet_only)  # fmt: skip
    # sd-scripts' ss_total_batch_size: per-device batch x processes x accumulation
    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    data = arch.build_dataset(args, total_batch_size)
    if len(data.dataset) == 0:
        source = args.dataset_config or args.train_data_dir or args.in_json
        raise InputError(f"{source}: the dataset has no images; expected image files in its folders")
    arch.load_models(ctx)
    vae, text_encoder, unet = arch.network_targets()

    # (1) merge --base_weights into the base model
    for i, path in enumerate(args.base_weights or []):
        mult = args.base_weights_multiplier[i] if args.base_weights_multiplier else 1.0
        module, weights_sd = network_module.create_network_from_weights(
            mult, path, vae, text_encoder, unet, for_inference=True
        )
        module.merge_to(text_encoder, unet, weights_sd, weight_dtype, "cpu")
        logger.info("merged base weights %s (multiplier %s)", path, mult)

    arch.cache(ctx, data)

    # (2) create the network
    net_kwargs = parse_network_args(args.network_args)
    if args.dim_from_weights:
        try:
            network, _ = network_module.create_network_from_weights(
                1, args.network_weights, vae, text_encoder, unet, **net_kwargs
            )
        except KeyError as e:
            raise ValueError(f"--network_weights {args.network_weights}: {e.args[0] if e.args else e}") from e
    else:
        if "dropout" not in net_kwargs:
            net_kwargs["dropout"] = args.network_dropout  # LyCORIS reads neuron dropout from kwargs
        network = network_module.create_network(
            1.0, args.network_dim, args.network_alpha, vae, text_encoder, unet,
            neuron_dropout=args.network_dropout, **net_kwargs,
        )  # fmt: skip
    if network is None:
        logger.info("the network module returned no network; nothing to train")
        return None
    graph_steps = getattr(args, "torch_compile", False) or getattr(args, "cuda_graph", False)
    if graph_steps and hasattr(network, "set_path_policy"):
        # compiled blocks and replayed graphs have little per-op host cost: paths by the graph-mode model
        network.set_path_policy(mode="graph")
    ratios = (args.loraplus_lr_ratio, args.loraplus_unet_lr_ratio, args.loraplus_text_encoder_lr_ratio)
    if any(r is not None for r in ratios):
        if not callable(getattr(network, "set_loraplus_lr_ratio", None)):
            raise ValueError(f"--loraplus_*_lr_ratio: {args.network_module} does not support LoRA+")
        network.set_loraplus_lr_ratio(*ratios)
    if hasattr(network, "set_dropout_seed"):  # rank/module/neuron dropout draws follow the run's seed
        network.set_dropout_seed(args.seed)
    # (3) optional hooks
    if hasattr(network, "prepare_network"):
        network.prepare_network(args)
    if args.scale_weight_norms and not hasattr(network, "apply_max_norm_regularization"):
        logger.warning("--scale_weight_norms: %s does not support it; disabled", args.network_module)
        args.scale_weight_norms = None
    train_unet, train_text_encoder = ctx.train_unet, ctx.train_text_encoder
    # (4) attach, (5) start weights, (6) checkpointing
    network.apply_to(text_encoder, unet, train_text_encoder, train_unet)
    if args.network_weights:
        try:
            info = network.load_weights(args.network_weights)
        except KeyError as e:  # the network names the offending key; keep its words, not KeyError's quotes
            raise ValueError(
                f"--network_weights {args.network_weights}: {e.args[0] if e.args else e} "
                f"(was it trained with another --network_module, or for another model?)"
            ) from e
        logger.info("loaded network weights %s: %s", args.network_weights, info)
    arch.prepare_models(ctx)
    if args.gradient_checkpointing and hasattr(network, "enable_gradient_checkpointing"):
        network.enable_gradient_checkpointing()
    if args.torch_compile:  # after apply_to: the patched Linear forwards are traced into the block graphs
        n_blocks = compile_repeated_blocks(
            arch.repeated_blocks(), args.dynamo_backend, getattr(args, "compile_mode", None)
        )
        logger.info("--torch_compile: %d blocks compiled (backend %s)", n_blocks, args.dynamo_backend)
        if hasattr(network, "use_device_module_dropout"):  # traced as a ×0/1 factor, not a graph break
            network.use_device_module_dropout()
        breaking = host_side_dropout(network)
        if breaking:
            logger.warning("--torch_compile: network %s draws from seeded generators that torch.compile "
                           "cannot trace; results stay the same but the block graphs break at each adapter",
                           " and ".join(breaking))  # fmt: skip

    # (7) parameter groups + optimizer
    te_lrs = args.text_encoder_lr or None
    te_lr_first = te_lrs[0] if te_lrs else None
    try:
        if hasattr(network, "prepare_optimizer_params_with_multiple_te_lrs"):
            results = network.prepare_optimizer_params_with_multiple_te_lrs(
                te_lrs, args.unet_lr, args.learning_rate
            )
        else:
            results = network.prepare_optimizer_params(te_lr_first, args.unet_lr, args.learning_rate)
    except TypeError:
        results = network.prepare_optimizer_params(te_lr_first, args.unet_lr)
    params, descriptions = results if isinstance(results, tuple) else (results, None)
    optimizer_name, optimizer_desc, optimizer = build_optimizer(args, params)
    lr_names = lr_log_names(descriptions, len(optimizer.param_groups), train_unet, train_text_encoder)

    # schedule length
    rank, world = accelerator.process_index, accelerator.num_processes
    batches_per_epoch = math.ceil(len(data.dataset) / world)
    updates_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    if args.max_train_epochs is not None:
        args.max_train_steps = args.max_train_epochs * updates_per_epoch
    num_epochs = math.ceil(args.max_train_steps / updates_per_epoch)
    if args.save_n_epoch_ratio:  # sd-scripts: save about N times over the run
        args.save_every_n_epochs = max(1, num_epochs // args.save_n_epoch_ratio)
    lr_scheduler = build_scheduler(args, optimizer, world)
    if data.set_max_train_steps is not None:
        data.set_max_train_steps(args.max_train_steps)

    # (8) dtype + accelerate
    if args.full_bf16:
        network.to(weight_dtype)
    network.to(accelerator.device)
    if world > 1:  # identical start on every rank (the network is not DDP-wrapped: see _sync_grads)
        for tensor in network.state_dict().values():
            torch.distributed.broadcast(tensor.data, src=0)
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    network.train()
    # (9)
    if hasattr(network, "prepare_grad_etc"):
        network.prepare_grad_etc(text_encoder, unet)
    trainable = list(network.get_trainable_params()) if hasattr(network, "get_trainable_params") else [
        p for p in network.parameters() if p.requires_grad
    ]  # fmt: skip
    if getattr(args, "cuda_graph", False):
        enable_cuda_graph_training(arch, ctx, network, trainable)

    # metadata
    base_md = saving.training_metadata(
        args, session_id=session_id, training_started_at=training_started_at,
        base_model_version=arch.base_model_version, optimizer_desc=optimizer_desc,
        num_train_images=data.num_train_images, num_reg_images=data.num_reg_images,
        num_batches_per_epoch=batches_per_epoch, num_epochs=num_epochs,
        network_args=net_kwargs if args.network_args else None, dataset_metadata=data.metadata,
    )  # fmt: skip
    base_md.update(arch.extra_metadata(args))
    modelspec = saving.build_modelspec(
        args, arch.modelspec_architecture, training_started_at, arch.modelspec_implementation
    )
    ext = args.save_model_as or "safetensors"

    net_size = sum(t.numel() * (save_dtype or t.dtype).itemsize for t in network.state_dict().values())

    def save_network(name: str, steps: int, epoch: int) -> Path:
        path = output_dir / name
        if accelerator.is_main_process:
            md = saving.finalize_metadata(
                base_md, modelspec, steps=steps, epoch=epoch, no_metadata=args.no_metadata
            )
            saving.atomic_write(path, lambda tmp: network.save_weights(tmp, save_dtype, md), size=net_size)
            logger.info("saved %s", path)
        return path

    settings = run_settings(args)

    def save_state(dirname: str, epoch_done: int, steps: int, batches_in_epoch: int) -> Path:
        return save_training_state(accelerator, output_dir / dirname, network, optimizer, settings,
                                   (epoch_done, steps, batches_in_epoch, step_starts))  # fmt: skip

    def stop_here(epoch: int, batches_in_epoch: int) -> None:
        """After a Ctrl-C: save the network and a resumable state at this step, then end the run."""
        name = saving.model_file_name(args.output_name, ext, step=global_step)
        done_here = last_saved == output_dir / name  # the periodic save of this very step
        net_path = output_dir / name if done_here else save_network(name, global_step, epoch)
        state_dir = save_state(saving.state_dir_name(args.output_name, step=global_step), epoch, global_step,
                               batches_in_epoch)  # fmt: skip
        accelerator.end_training()
        progress.close()
        raise TrainingInterrupted(global_step, args.max_train_steps, net_path, state_dir)

    # resume
    global_step, first_epoch, skip_batches, resume_rng, step_starts = 0, 0, 0, None, 0
    if args.resume:
        point = load_resume_state(args, accelerator, network, optimizer_desc)
        first_epoch, global_step, skip_batches = point.epoch, point.step, point.skip_batches
        if hasattr(network, "on_step_start"):
            # replay the step starts so dropout continues with the draws the interrupted run would make
            for _ in range(point.step_starts):
                network.on_step_start(text_encoder, unet)
                step_starts += 1
        resume_rng = _rng_snapshot()
        logger.info("resumed from %s: epoch %d, step %d", args.resume, first_epoch, global_step)

    if args.log_with:
        init_kwargs = {"wandb": {"name": args.wandb_run_name}} if args.wandb_run_name else {}
        config = None
        if args.log_config:  # trackers accept scalars and strings only
            config = {
                k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()
            }
        accelerator.init_trackers(
            args.log_tracker_name or "network_train", config=config, init_kwargs=init_kwargs
        )

    prompt_lines = _read_prompts(args)

    def sample(epoch: int | None, step: int) -> None:
        if not prompt_lines or not accelerator.is_main_process:
            return
        snap = _rng_snapshot()  # sampling must not change the training RNG stream
        network.eval()
        sample_dir = output_dir / "sample"
        sample_dir.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d%H%M%S")
        bases = [
            sample_dir / sample_file_name(args.output_name, epoch, step, i, stamp)
            for i in range(len(prompt_lines))
        ]
        with torch.no_grad():
            arch.sample_images(ctx, prompt_lines, bases)
        network.train()
        _rng_restore(snap)

    recorder = LossRecorder()
    losses: list[float] = []
    n_workers = min(args.max_data_loader_n_workers if hasattr(args, "max_data_loader_n_workers") else 0,
                    os.cpu_count() or 1)  # fmt: skip
    progress = tqdm(range(args.max_train_steps), initial=global_step, smoothing=0, desc="steps",
                    disable=not accelerator.is_local_main_process)  # fmt: skip
    if args.sample_at_first:
        sample(None, 0)
    last_saved: Path | None = None
    done = global_step >= args.max_train_steps
    stopping = False
    stop.arm()  # from here a first Ctrl-C finishes the step and saves
    for epoch in range(first_epoch, num_epochs):
        if done:
            break
        if data.set_epoch is not None:
            data.set_epoch(epoch + 1)
        if resume_rng is not None:  # restore the exact RNG stream of the interrupted run
            _rng_restore(resume_rng)
            resume_rng = None
        if hasattr(network, "on_epoch_start"):
            network.on_epoch_start(text_encoder, unet)
        indices = epoch_batches(len(data.dataset), epoch, args.seed, rank, world)
        loader = torch.utils.data.DataLoader(
            data.dataset, batch_size=1, sampler=indices[skip_batches:], collate_fn=data.collate_fn,
            num_workers=n_workers, generator=torch.Generator().manual_seed(args.seed + epoch),
        )  # fmt: skip
        batch_pos = skip_batches
        skip_batches = 0
        for batch in loader:
            batch_pos += 1
            if batch_pos == len(
                indices
            ):  # an epoch's last batch ends an accumulation cycle (as in sd-scripts)
                accelerator.step = args.gradient_accumulation_steps - 1
            if data.set_step is not None:
                data.set_step(global_step)
            with accelerator.accumulate(network):
                if hasattr(network, "on_step_start"):
                    network.on_step_start(text_encoder, unet)
                    step_starts += 1
                with accelerator.autocast():
                    per_sample = arch.per_sample_loss(ctx, batch)
                loss = per_sample.float().mean()
                stopping |= _check_step(
                    loss, accelerator, global_step + 1, epoch + 1, last_saved, stop.requested
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    _sync_grads(trainable, world)
                    if args.max_grad_norm:
                        accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                # --cuda_graph: grads stay bound to the buffers its backward graph accumulates into
                optimizer.zero_grad(set_to_none=not getattr(args, "cuda_graph", False))
            logs: dict[str, float] = {}
            if args.scale_weight_norms:
                keys_scaled, mean_norm, max_norm = network.apply_max_norm_regularization(
                    args.scale_weight_norms, accelerator.device
                )
                logs.update({"max_norm/keys_scaled": keys_scaled, "max_norm/average_key_norm": float(mean_norm),
                             "max_norm/max_key_norm": float(max_norm)})  # fmt: skip
            current = loss.detach().item()
            recorder.add(epoch, batch_pos - 1, current)
            losses.append(current)
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress.update(1)
            lrs = [g["lr"] for g in optimizer.param_groups]
            progress.set_postfix(loss=f"{recorder.moving_average:.4f}", lr=f"{lrs[0]:.2e}" if lrs else "-")
            if args.log_with:
                logs.update({"loss/current": current, "loss/average": recorder.moving_average})
                for name, group in zip(lr_names, optimizer.param_groups):
                    logs[f"lr/{name}"] = group["lr"]
                    if "d" in group:  # D-Adaptation / Prodigy: the effective step size
                        logs[f"lr/d*lr/{name}"] = group["d"] * group["lr"]
                accelerator.log(logs, step=global_step)
            if (
                args.sample_every_n_steps
                and not args.sample_every_n_epochs
                and global_step % args.sample_every_n_steps == 0
            ):
                sample(None, global_step)
            if args.save_every_n_steps and global_step % args.save_every_n_steps == 0:
                accelerator.wait_for_everyone()
                last_saved = save_network(
                    saving.model_file_name(args.output_name, ext, step=global_step), global_step, epoch
                )
                _remove_old_step(args, output_dir, ext, global_step, accelerator)
                if args.save_state:
                    save_state(
                        saving.state_dir_name(args.output_name, step=global_step),
                        epoch,
                        global_step,
                        batch_pos,
                    )
            if global_step >= args.max_train_steps:
                done = True
                break
            if stopping:
                stop_here(epoch, batch_pos)
        if args.log_with:
            accelerator.log({"loss/epoch_average": recorder.moving_average}, step=epoch + 1)
        accelerator.wait_for_everyone()
        epoch_no = epoch + 1
        if args.save_every_n_epochs and epoch_no % args.save_every_n_epochs == 0 and epoch_no < num_epochs:
            last_saved = save_network(
                saving.model_file_name(args.output_name, ext, epoch=epoch_no), global_step, epoch_no
            )
            _remove_old_epoch(args, output_dir, ext, epoch_no, accelerator)
            if args.save_state:
                save_state(saving.state_dir_name(args.output_name, epoch=epoch_no), epoch_no, global_step, 0)
        if args.sample_every_n_epochs and epoch_no % args.sample_every_n_epochs == 0:
            sample(epoch_no, global_step)

    accelerator.wait_for_everyone()
    stop.disarm()  # the final saves are short; a Ctrl-C now stops at once (atomic writes keep files whole)
    final_epoch = num_epochs
    if args.save_state or args.save_state_on_train_end:
        save_state(saving.state_dir_name(args.output_name), final_epoch, global_step, 0)
    final = save_network(saving.model_file_name(args.output_name, ext), global_step, final_epoch)
    accelerator.end_training()
    progress.close()
    return TrainResult(final if accelerator.is_main_process else None, network, global_step, losses)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if not args.sample_prompts:
        return []
    from library.inference.prompt_options import read_prompt_file

    return read_prompt_file(args.sample_prompts)


def _check_step(
    loss: torch.Tensor, accelerator: Accelerator, step: int, epoch: int, last: Path | None, stop: bool
) -> bool:
    """NaN/Inf on any rank stops every rank with the step number; earlier saves stay untouched. Returns
    whether any rank was asked to stop (Ctrl-C), so that all ranks stop after the same step."""
    flags = torch.stack(
        [(~torch.isfinite(loss.detach())).float(), torch.tensor(float(stop), device=loss.device)]
    )
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, "sum")
    bad, stop_any = flags.tolist()
    if bad > 0:
        where = f"the last good save is {last}" if last else "nothing was saved yet"
        raise FloatingPointError(f"loss is NaN/Inf at step {step} (epoch {epoch}); training stopped, {where}")
    return stop_any > 0


def _sync_grads(params: list[torch.nn.Parameter], world: int) -> None:
    """Mean all-reduce of the network gradients (the network is called through patched modules, not DDP)."""
    if world <= 1:
        return
    for p in params:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
            p.grad.div_(world)


def _remove_old_epoch(args: argparse.Namespace, out: Path, ext: str, epoch_no: int, acc: Accelerator) -> None:
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


def _remove_old_step(args: argparse.Namespace, out: Path, ext: str, step: int, acc: Accelerator) -> None:
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
