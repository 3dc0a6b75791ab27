"""One training run in named phases: the body of `library.training.loop.train`.

`TrainingRun.execute` reads top to bottom as the recipe: set up the run, merge base weights, cache,
build the network, build the optimizer, prepare saving, resume, start logging, run the epochs, finish.
Each phase is a method of its own; the state they hand on lives on the run object. The call order of
the network's methods is sd-scripts' network contract (docs/architecture.md).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from tqdm import tqdm

from library.io.errors import InputError, TrainingInterrupted
from library.io.host_memory import give_back_host_memory
from library.training import saving
from library.training.architecture import RunContext, TrainingArchitecture, compile_repeated_blocks
from library.training.cuda_graph import enable_cuda_graph_training, graph_unsafe_dropout, host_side_dropout
from library.training.flat_8bit import flatten_optimizer
from library.training.optimizers import build_optimizer, build_scheduler
from library.training.state import check_resume_folder, load_resume_state, run_settings, save_training_state
from library.training.step_mode import StepFacts, StepMode, decide_step_mode
from library.training.steps import (
    TrainResult,
    dtypes,
    epoch_batches,
    make_accelerator,
    read_prompts,
    read_step,
    remove_old_epoch,
    remove_old_step,
    rng_restore,
    rng_snapshot,
    sync_grads,
)
from library.training.stop_request import StopRequest
from library.training.utils import (
    LossRecorder,
    import_network_module,
    lr_log_names,
    parse_network_args,
    sample_file_name,
)

logger = logging.getLogger(__name__)


class TrainingRun:
    """The state one run builds phase by phase, and the actions (save, sample, step) the loop calls."""

    def __init__(self, args: argparse.Namespace, arch: TrainingArchitecture, stop: StopRequest) -> None:
        self.args, self.arch, self.stop = args, arch, stop
        self.session_id = random.randint(0, 2**32 - 1)
        self.started_at = time.time()
        self.global_step = 0
        self.step_starts = 0  # network.on_step_start calls so far (resume replays them)
        self.losses: list[float] = []
        self.last_saved: Path | None = None

    def execute(self) -> TrainResult | None:
        self.setup()
        self.merge_base_weights()
        self.arch.cache(self.ctx, self.data)
        self.arch.load_after_cache(self.ctx)
        self.vae, self.text_encoder, self.unet = self.arch.network_targets()  # with what it loaded
        if not self.build_network():
            return None
        self.attach_network()
        self.build_optimizer()
        self.prepare_saving()
        self.resume()
        self.start_logging()
        # what loading, caching and the moves to the device freed leaves the process here, not at the C heap
        give_back_host_memory("before the first step")
        self.run_epochs()
        return self.finish()

    # ------------------------------------------------------------------ setup phases
    def setup(self) -> None:
        """Checks that need no model, the seed, accelerate, the dataset and the models."""
        args = self.args
        self.output_dir = saving.check_output_dir_writable(args.output_dir)  # fail before any heavy work
        if args.resume:
            check_resume_folder(args)  # a state that cannot fit this run is named before any model loads
        if args.seed is None:
            args.seed = random.randint(0, 2**32 - 1)
        set_seed(args.seed)
        self.network_module = import_network_module(args.network_module)
        acc = self.accelerator = make_accelerator(args)
        logger.info("accelerate: %d process(es), %s, device %s, mixed precision %s", acc.num_processes,
                    acc.distributed_type, acc.device, acc.mixed_precision)  # fmt: skip
        self.weight_dtype, self.save_dtype = dtypes(args)
        self.ctx = RunContext(args, acc, self.weight_dtype, train_unet=not args.network_train_text_encoder_only,
                              train_text_encoder=not args.network_train_unet_only)  # fmt: skip
        self.rank, self.world = acc.process_index, acc.num_processes
        # sd-scripts' ss_total_batch_size: per-device batch x processes x accumulation
        self.total_batch_size = args.train_batch_size * self.world * args.gradient_accumulation_steps
        self.data = self.arch.build_dataset(args, self.total_batch_size)
        if len(self.data.dataset) == 0:
            source = args.dataset_config or args.train_data_dir or args.in_json
            raise InputError(f"{source}: the dataset has no images; expected image files in its folders")
        self.arch.load_models(self.ctx)
        self.vae, self.text_encoder, self.unet = self.arch.network_targets()

    def merge_base_weights(self) -> None:
        """--base_weights: networks merged into the frozen model before training."""
        args = self.args
        for i, path in enumerate(args.base_weights or []):
            mult = args.base_weights_multiplier[i] if args.base_weights_multiplier else 1.0
            module, weights_sd = self.network_module.create_network_from_weights(
                mult, path, self.vae, self.text_encoder, self.unet, for_inference=True
            )
            module.merge_to(self.text_encoder, self.unet, weights_sd, self.weight_dtype, "cpu")
            logger.info("merged base weights %s (multiplier %s)", path, mult)

    def build_network(self) -> bool:
        """Create the network (from the flags or --dim_from_weights) and apply its options; False: none."""
        args = self.args
        self.net_kwargs = parse_network_args(args.network_args)
        targets = (self.vae, self.text_encoder, self.unet)
        if args.dim_from_weights:
            try:
                network, _ = self.network_module.create_network_from_weights(
                    1, args.network_weights, *targets, **self.net_kwargs
                )
            except KeyError as e:
                raise ValueError(
                    f"--network_weights {args.network_weights}: {e.args[0] if e.args else e}"
                ) from e
        else:
            if "dropout" not in self.net_kwargs:
                self.net_kwargs["dropout"] = args.network_dropout  # LyCORIS reads neuron dropout from kwargs
            network = self.network_module.create_network(
                1.0, args.network_dim, args.network_alpha, *targets, neuron_dropout=args.network_dropout,
                **self.net_kwargs,
            )  # fmt: skip
        if network is None:
            logger.info("the network module returned no network; nothing to train")
            return False
        self.network = network
        self.ctx.step_mode = self.decide_step_mode()
        if (args.torch_compile or self.ctx.graph_step) and hasattr(network, "set_path_policy"):
            # compiled blocks and replayed graphs have little per-op host cost: paths by the graph-mode model
            network.set_path_policy(mode="graph")
        ratios = (args.loraplus_lr_ratio, args.loraplus_unet_lr_ratio, args.loraplus_text_encoder_lr_ratio)
        if any(r is not None for r in ratios):
            if not callable(getattr(network, "set_loraplus_lr_ratio", None)):
                raise ValueError(f"--loraplus_*_lr_ratio: {args.network_module} does not support LoRA+")
            network.set_loraplus_lr_ratio(*ratios)
        if hasattr(network, "set_dropout_seed"):  # rank/module/neuron dropout draws follow the run's seed
            network.set_dropout_seed(args.seed)
        if hasattr(network, "prepare_network"):
            network.prepare_network(args)
        if args.scale_weight_norms and not hasattr(network, "apply_max_norm_regularization"):
            logger.warning("--scale_weight_norms: %s does not support it; disabled", args.network_module)
            args.scale_weight_norms = None
        return True

    def decide_step_mode(self) -> StepMode:
        """Graph or eager step, once per run: the network exists, the models' checkpointing is not set yet."""
        acc, network = self.accelerator, self.network
        facts = StepFacts.from_args(
            self.args, device_type=acc.device.type, num_processes=acc.num_processes,
            host_dropout=tuple(graph_unsafe_dropout(network)),
            network_draws_per_step=hasattr(network, "prepare_step_masks"),
            trainer_without_graph=None if self.arch.has_graph_step() else type(self.arch).__name__,
        )  # fmt: skip
        mode = decide_step_mode(facts)
        for warning in mode.warnings:
            logger.warning(warning)
        logger.info(mode.log_line())
        return mode

    def attach_network(self) -> None:
        """Patch the model's layers, load starting weights, then checkpointing and compiling."""
        args, network = self.args, self.network
        network.apply_to(self.text_encoder, self.unet, self.ctx.train_text_encoder, self.ctx.train_unet)
        if args.network_weights:
            try:
                info = network.load_weights(args.network_weights)
            except (
                KeyError
            ) as e:  # the network names the offending key; keep its words, not KeyError's quotes
                raise ValueError(
                    f"--network_weights {args.network_weights}: {e.args[0] if e.args else e} "
                    f"(was it trained with another --network_module, or for another model?)"
                ) from e
            logger.info("loaded network weights %s: %s", args.network_weights, info)
        self.arch.prepare_models(self.ctx)
        if args.gradient_checkpointing and hasattr(network, "enable_gradient_checkpointing"):
            network.enable_gradient_checkpointing()
        if args.torch_compile:  # after apply_to: the patched Linear forwards are traced into the block graphs
            n_blocks = compile_repeated_blocks(
                self.arch.repeated_blocks(), args.dynamo_backend, getattr(args, "compile_mode", None)
            )
            logger.info("--torch_compile: %d blocks compiled (backend %s)", n_blocks, args.dynamo_backend)
            if hasattr(network, "use_device_module_dropout"):  # traced as a ×0/1 factor, not a graph break
                network.use_device_module_dropout()
            breaking = host_side_dropout(network)
            if breaking:
                logger.warning("--torch_compile: network %s draws from seeded generators that torch.compile "
                               "cannot trace; results stay the same but the block graphs break at each adapter",
                               " and ".join(breaking))  # fmt: skip

    def _param_groups(self) -> tuple[Any, list[str] | None]:
        args, network = self.args, self.network
        te_lrs = args.text_encoder_lr or None
        if hasattr(network, "prepare_optimizer_params_with_multiple_te_lrs"):
            results = network.prepare_optimizer_params_with_multiple_te_lrs(
                te_lrs, args.unet_lr, args.learning_rate
            )
        elif _accepts_positional(network.prepare_optimizer_params, 3):
            results = network.prepare_optimizer_params(
                te_lrs[0] if te_lrs else None, args.unet_lr, args.learning_rate
            )
        else:  # an older network module: (text_encoder_lr, unet_lr)
            results = network.prepare_optimizer_params(te_lrs[0] if te_lrs else None, args.unet_lr)
        return results if isinstance(results, tuple) else (results, None)

    def build_optimizer(self) -> None:
        """Parameter groups, optimizer, the schedule's length and scheduler, then accelerate and graphs."""
        args, network, acc = self.args, self.network, self.accelerator
        params, descriptions = self._param_groups()
        self.optimizer_name, self.optimizer_desc, optimizer = build_optimizer(args, params)
        self.lr_names = lr_log_names(
            descriptions, len(optimizer.param_groups), self.ctx.train_unet, self.ctx.train_text_encoder
        )
        self.batches_per_epoch = math.ceil(len(self.data.dataset) / self.world)
        updates_per_epoch = math.ceil(self.batches_per_epoch / args.gradient_accumulation_steps)
        if args.max_train_epochs is not None:
            args.max_train_steps = args.max_train_epochs * updates_per_epoch
        self.num_epochs = math.ceil(args.max_train_steps / updates_per_epoch)
        if args.save_n_epoch_ratio:  # sd-scripts: save about N times over the run
            args.save_every_n_epochs = max(1, self.num_epochs // args.save_n_epoch_ratio)
        lr_scheduler = build_scheduler(args, optimizer, self.world)
        if self.data.set_max_train_steps is not None:
            self.data.set_max_train_steps(args.max_train_steps)
        if args.full_bf16:
            network.to(self.weight_dtype)
        network.to(acc.device)
        # after the moves and casts above: the flat 8-bit layout makes the params views of one buffer
        line = flatten_optimizer(
            optimizer,
            host_module_dropout=not self.ctx.graph_step and "module dropout" in host_side_dropout(network),
        )
        if line:
            logger.info(line)
        if self.world > 1:  # identical start on every rank (the network is not DDP-wrapped: see sync_grads)
            for tensor in network.state_dict().values():
                torch.distributed.broadcast(tensor.data, src=0)
        self.optimizer, self.lr_scheduler = acc.prepare(optimizer, lr_scheduler)
        network.train()
        if hasattr(network, "prepare_grad_etc"):
            network.prepare_grad_etc(self.text_encoder, self.unet)
        if hasattr(network, "get_trainable_params"):
            self.trainable = list(network.get_trainable_params())
        else:
            self.trainable = [p for p in network.parameters() if p.requires_grad]
        if self.ctx.graph_step:
            enable_cuda_graph_training(self.arch, self.ctx, network, self.trainable)

    def prepare_saving(self) -> None:
        """The metadata every saved file carries, the file extension and size, the state's settings."""
        args, arch, data = self.args, self.arch, self.data
        self.base_md = saving.training_metadata(
            args, session_id=self.session_id, training_started_at=self.started_at,
            base_model_version=arch.base_model_version, optimizer_desc=self.optimizer_desc,
            num_train_images=data.num_train_images, num_reg_images=data.num_reg_images,
            num_batches_per_epoch=self.batches_per_epoch, num_epochs=self.num_epochs,
            network_args=self.net_kwargs if args.network_args else None, dataset_metadata=data.metadata,
        )  # fmt: skip
        self.base_md.update(arch.extra_metadata(args))
        self.modelspec = saving.build_modelspec(
            args, arch.modelspec_architecture, self.started_at, arch.modelspec_implementation
        )
        self.ext = args.save_model_as or "safetensors"
        sd = self.network.state_dict().values()
        self.net_size = sum(t.numel() * (self.save_dtype or t.dtype).itemsize for t in sd)
        self.settings = run_settings(args)

    def resume(self) -> None:
        """--resume: network, optimizer and position; the RNG stream continues where the run stopped."""
        self.first_epoch, self.skip_batches, self.resume_rng = 0, 0, None
        if not self.args.resume:
            return
        point = load_resume_state(
            self.args, self.accelerator, self.network, self.optimizer, self.optimizer_desc
        )
        self.first_epoch, self.global_step, self.skip_batches = point.epoch, point.step, point.skip_batches
        if hasattr(self.network, "on_step_start"):
            # replay the step starts so dropout continues with the draws the interrupted run would make
            for _ in range(point.step_starts):
                self.network.on_step_start(self.text_encoder, self.unet)
                self.step_starts += 1
        self.resume_rng = rng_snapshot()
        logger.info(
            "resumed from %s: epoch %d, step %d", self.args.resume, self.first_epoch, self.global_step
        )

    def start_logging(self) -> None:
        """Trackers, sample prompts and the progress bar."""
        args = self.args
        if args.log_with:
            init_kwargs = {"wandb": {"name": args.wandb_run_name}} if args.wandb_run_name else {}
            config = None
            if args.log_config:  # trackers accept scalars and strings only
                config = {
                    k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()
                }
            self.accelerator.init_trackers(
                args.log_tracker_name or "network_train", config=config, init_kwargs=init_kwargs
            )
        self.prompt_lines = read_prompts(args)
        self.recorder = LossRecorder()
        self.progress = tqdm(range(args.max_train_steps), initial=self.global_step, smoothing=0, desc="steps",
                             disable=not self.accelerator.is_local_main_process)  # fmt: skip

    # ------------------------------------------------------------------ the loop
    def run_epochs(self) -> None:
        args = self.args
        if args.sample_at_first:
            self.sample(None, 0)
        self.done = self.global_step >= args.max_train_steps
        self.stopping = False
        self.stop.arm()  # from here a first Ctrl-C finishes the step and saves
        for epoch in range(self.first_epoch, self.num_epochs):
            if self.done:
                break
            self.run_epoch(epoch)
            self.end_epoch(epoch + 1)

    def _loader(self, epoch: int) -> tuple[torch.utils.data.DataLoader, int, int]:
        """This process's batches of the epoch (past those already seen when resuming)."""
        args = self.args
        indices = epoch_batches(len(self.data.dataset), epoch, args.seed, self.rank, self.world)
        n_workers = min(getattr(args, "max_data_loader_n_workers", 0), os.cpu_count() or 1)
        loader = torch.utils.data.DataLoader(
            self.data.dataset, batch_size=1, sampler=indices[self.skip_batches :], collate_fn=self.data.collate_fn,
            num_workers=n_workers, generator=torch.Generator().manual_seed(args.seed + epoch),
        )  # fmt: skip
        start = self.skip_batches
        self.skip_batches = 0
        return loader, start, len(indices)

    def run_epoch(self, epoch: int) -> None:
        data, network = self.data, self.network
        if data.set_epoch is not None:
            data.set_epoch(epoch + 1)
        if self.resume_rng is not None:  # restore the exact RNG stream of the interrupted run
            rng_restore(self.resume_rng)
            self.resume_rng = None
        if hasattr(network, "on_epoch_start"):
            network.on_epoch_start(self.text_encoder, self.unet)
        loader, batch_pos, n_batches = self._loader(epoch)
        for batch in loader:
            batch_pos += 1
            if batch_pos == n_batches:  # an epoch's last batch ends an accumulation cycle (as in sd-scripts)
                self.accelerator.step = self.args.gradient_accumulation_steps - 1
            loss, logs = self.train_step(batch, epoch)
            self.recorder.add(epoch, batch_pos - 1, loss)
            self.losses.append(loss)
            if not self.accelerator.sync_gradients:
                continue
            self.global_step += 1
            self.after_update(epoch, batch_pos, loss, logs)
            if self.global_step >= self.args.max_train_steps:
                self.done = True
                return
            if self.stopping:
                self.stop_here(epoch, batch_pos)

    def train_step(self, batch: dict[str, Any], epoch: int) -> tuple[float, dict[str, float]]:
        """One micro-batch: loss, backward, and (at an accumulation boundary) the optimizer update."""
        args, acc, network = self.args, self.accelerator, self.network
        if self.data.set_step is not None:
            self.data.set_step(self.global_step)
        with acc.accumulate(network):
            if hasattr(network, "on_step_start"):
                network.on_step_start(self.text_encoder, self.unet)
                self.step_starts += 1
            with acc.autocast():
                per_sample = self.arch.per_sample_loss(self.ctx, batch)
            loss = per_sample.float().mean()
            acc.backward(loss)
            if acc.sync_gradients:
                sync_grads(self.trainable, self.world)
                if args.max_grad_norm:
                    acc.clip_grad_norm_(self.trainable, args.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            # graph step: grads stay bound to the buffers its backward graph accumulates into
            self.optimizer.zero_grad(set_to_none=not self.ctx.graph_step)
        logs: dict[str, float] = {}
        if args.scale_weight_norms:
            keys_scaled, mean_norm, max_norm = network.apply_max_norm_regularization(
                args.scale_weight_norms, acc.device
            )
            logs.update({"max_norm/keys_scaled": keys_scaled, "max_norm/average_key_norm": float(mean_norm),
                         "max_norm/max_key_norm": float(max_norm)})  # fmt: skip
        value, stop = read_step(
            loss, acc, self.global_step + 1, epoch + 1, self.last_saved, self.stop.requested
        )
        self.stopping |= stop
        return value, logs

    def after_update(self, epoch: int, batch_pos: int, loss: float, logs: dict[str, float]) -> None:
        """Progress, logs, and the step-based samples and saves."""
        args, step = self.args, self.global_step
        self.progress.update(1)
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.progress.set_postfix(
            loss=f"{self.recorder.moving_average:.4f}", lr=f"{lrs[0]:.2e}" if lrs else "-"
        )
        if args.log_with:
            logs.update({"loss/current": loss, "loss/average": self.recorder.moving_average})
            for name, group in zip(self.lr_names, self.optimizer.param_groups):
                logs[f"lr/{name}"] = group["lr"]
                if "d" in group:  # D-Adaptation / Prodigy: the effective step size
                    logs[f"lr/d*lr/{name}"] = group["d"] * group["lr"]
            self.accelerator.log(logs, step=step)
        if (
            args.sample_every_n_steps
            and not args.sample_every_n_epochs
            and step % args.sample_every_n_steps == 0
        ):
            self.sample(None, step)
        if args.save_every_n_steps and step % args.save_every_n_steps == 0:
            self.accelerator.wait_for_everyone()
            self.last_saved = self.save_network(
                saving.model_file_name(args.output_name, self.ext, step=step), epoch
            )
            remove_old_step(args, self.output_dir, self.ext, step, self.accelerator)
            if args.save_state:
                self.save_state(saving.state_dir_name(args.output_name, step=step), epoch, batch_pos)

    def end_epoch(self, epoch_no: int) -> None:
        """The epoch's average loss, and the epoch-based saves and samples."""
        args, acc = self.args, self.accelerator
        if args.log_with:
            acc.log({"loss/epoch_average": self.recorder.moving_average}, step=epoch_no)
        acc.wait_for_everyone()
        if (
            args.save_every_n_epochs
            and epoch_no % args.save_every_n_epochs == 0
            and epoch_no < self.num_epochs
        ):
            name = saving.model_file_name(args.output_name, self.ext, epoch=epoch_no)
            self.last_saved = self.save_network(name, epoch_no)
            remove_old_epoch(args, self.output_dir, self.ext, epoch_no, acc)
            if args.save_state:
                self.save_state(saving.state_dir_name(args.output_name, epoch=epoch_no), epoch_no, 0)
        if args.sample_every_n_epochs and epoch_no % args.sample_every_n_epochs == 0:
            self.sample(epoch_no, self.global_step)

    def finish(self) -> TrainResult:
        """The final state (if asked) and network."""
        args, acc = self.args, self.accelerator
        acc.wait_for_everyone()
        self.stop.disarm()  # the final saves are short; a Ctrl-C now stops at once (atomic writes keep files whole)
        if args.save_state or args.save_state_on_train_end:
            self.save_state(saving.state_dir_name(args.output_name), self.num_epochs, 0)
        final = self.save_network(saving.model_file_name(args.output_name, self.ext), self.num_epochs)
        acc.end_training()
        self.progress.close()
        return TrainResult(
            final if acc.is_main_process else None, self.network, self.global_step, self.losses
        )

    # ------------------------------------------------------------------ actions
    def save_network(self, name: str, epoch: int) -> Path:
        path = self.output_dir / name
        if self.accelerator.is_main_process:
            md = saving.finalize_metadata(
                self.base_md,
                self.modelspec,
                steps=self.global_step,
                epoch=epoch,
                no_metadata=self.args.no_metadata,
            )
            network, save_dtype = self.network, self.save_dtype
            saving.atomic_write(
                path, lambda tmp: network.save_weights(tmp, save_dtype, md), size=self.net_size
            )
            logger.info("saved %s", path)
        return path

    def save_state(self, dirname: str, epoch_done: int, batches_in_epoch: int) -> Path:
        position = (epoch_done, self.global_step, batches_in_epoch, self.step_starts)
        return save_training_state(
            self.accelerator, self.output_dir / dirname, self.network, self.optimizer, self.settings, position
        )

    def stop_here(self, epoch: int, batches_in_epoch: int) -> None:
        """After a Ctrl-C: save the network and a resumable state at this step, then end the run."""
        args, step = self.args, self.global_step
        name = saving.model_file_name(args.output_name, self.ext, step=step)
        done_here = self.last_saved == self.output_dir / name  # the periodic save of this very step
        net_path = self.output_dir / name if done_here else self.save_network(name, epoch)
        state_dir = self.save_state(
            saving.state_dir_name(args.output_name, step=step), epoch, batches_in_epoch
        )
        self.accelerator.end_training()
        self.progress.close()
        raise TrainingInterrupted(step, args.max_train_steps, net_path, state_dir)

    def sample(self, epoch: int | None, step: int) -> None:
        if not self.prompt_lines or not self.accelerator.is_main_process:
            return
        snap = rng_snapshot()  # sampling must not change the training RNG stream
        self.network.eval()
        sample_dir = self.output_dir / "sample"
        sample_dir.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d%H%M%S")
        bases = [
            sample_dir / sample_file_name(self.args.output_name, epoch, step, i, stamp)
            for i in range(len(self.prompt_lines))
        ]
        with torch.no_grad():
            self.arch.sample_images(self.ctx, self.prompt_lines, bases)
        self.network.train()
        rng_restore(snap)


def _accepts_positional(fn: Any, n: int) -> bool:
    """Whether `fn` takes `n` positional arguments (an older network's prepare_optimizer_params takes 2)."""
    import inspect

    try:
        inspect.signature(fn).bind(*([None] * n))
    except TypeError:
        return False
    except ValueError:  # no signature to read (a builtin): assume the current contract
        return True
    return True
