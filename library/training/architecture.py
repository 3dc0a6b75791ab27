"""The architecture half of a trainer (SDXL, Anima) as the shared loop of library/training/loop.py sees it.

What both architectures do the same way lives here (dataset group + its metadata, latents of a batch,
cache arguments, the sample-prompt loop and PNG writing); a subclass supplies only what differs
(models, caches, the loss, how one sample image is generated).
"""

from __future__ import annotations

import abc
import argparse
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from PIL import Image

from library.training import saving
from library.training.step_mode import StepMode


@dataclass
class RunContext:
    """What every architecture hook needs to know about the run."""

    args: argparse.Namespace
    accelerator: Accelerator
    weight_dtype: torch.dtype  # dtype of the frozen base model
    train_unet: bool = True
    train_text_encoder: bool = True
    step_mode: StepMode | None = None  # decided once by the run, before the models' checkpointing is set up

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def graph_step(self) -> bool:
        """Whether the training step replays CUDA graphs (`library.training.step_mode`)."""
        return self.step_mode is not None and self.step_mode.graph

    @property
    def graph_step_falls_back(self) -> bool:
        """A failed capture turns the run eager instead of stopping it: the graph step is the default,
        not asked for with --cuda_graph."""
        return self.step_mode is not None and self.step_mode.graph_by_default


@dataclass
class DatasetInfo:
    """What the loop needs from a dataset: item i is one ready batch (dict); plus counts and metadata."""

    dataset: torch.utils.data.Dataset
    collate_fn: Any
    num_train_images: int
    num_reg_images: int
    metadata: dict[str, str] = field(default_factory=dict)
    set_epoch: Any = None  # callable(epoch: int) -> None, reshuffles buckets/captions for that epoch
    set_step: Any = None  # callable(global_step: int) -> None (token warmup)
    set_max_train_steps: Any = None  # callable(max_train_steps: int) -> None


@dataclass
class SampleRequest:
    """One parsed sample-prompt line with the defaults applied (sd-scripts: 512², 30 steps, CFG 7.5)."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    scale: float
    seed: int | None  # the line's --d seed (named in the file), None if the line has none
    run_seed: int  # the seed actually used
    sampler: str
    extra: dict[str, str] = field(default_factory=dict)  # architecture options cut from the line


class TrainingArchitecture(abc.ABC):
    """The architecture-specific half of a trainer."""

    base_model_version: str  # ss_base_model_version
    script: str = "train_network.py"  # the entry script, for the resume command printed after Ctrl-C
    modelspec_architecture: str  # e.g. "stable-diffusion-xl-v1-base"
    modelspec_implementation: str = saving.IMPLEMENTATION_SGM
    bucket_step_multiple: int = 64  # bucket sides are multiples of this
    sample_size_multiple: int = 8  # sample width/height are floored to a multiple of this ...
    sample_min_size: int = 8  # ... and at least this

    def __init__(self) -> None:
        self.models: Any = None
        self.dataset: Any = None  # the DatasetGroup once build_dataset ran

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:  # noqa: B027 - optional hook
        """Architecture flags (added before the shared ones)."""

    def verify_args(self, args: argparse.Namespace) -> None:  # noqa: B027 - optional hook
        """Architecture-specific checks of the parsed args."""

    def extra_metadata(self, args: argparse.Namespace) -> dict[str, str]:
        """Architecture-specific ``ss_*`` metadata added to every saved network (e.g. Anima's sampling)."""
        return {}

    # ------------------------------------------------------------------ data
    def build_dataset(self, args: argparse.Namespace, total_batch_size: int) -> DatasetInfo:
        """Read the dataset config/folders (no model needed yet): bad data fails before loading models.

        ``total_batch_size`` (batch × processes × accumulation) goes to ``ss_total_batch_size``.
        """
        from library.data import build_dataset_group, collate_unwrap, dataset_metadata

        group = build_dataset_group(args, bucket_step_multiple=self.bucket_step_multiple)
        self.dataset = group
        return DatasetInfo(
            dataset=group,
            collate_fn=collate_unwrap,
            num_train_images=group.num_train_images,
            num_reg_images=group.num_reg_images,
            metadata=dataset_metadata(group, args, total_batch_size),
            set_epoch=group.set_current_epoch,
            set_step=group.set_current_step,
            set_max_train_steps=group.set_max_train_steps,
        )

    @staticmethod
    def cache_kwargs(ctx: RunContext) -> dict[str, Any]:
        """The arguments every cache call shares (ranks split the work; the main one shows progress)."""
        acc = ctx.accelerator
        return dict(
            skip_cache_check=bool(getattr(ctx.args, "skip_cache_check", False)),
            process_index=acc.process_index,
            num_processes=acc.num_processes,
            wait_for_everyone=acc.wait_for_everyone,
            show_progress=acc.is_local_main_process,
        )

    def batch_latents(self, ctx: RunContext, batch: dict[str, Any]) -> torch.Tensor:
        """Unscaled fp32 latents of a batch: the cached ones, else encoded from its images now,
        `--vae_batch_size` images at a time as sd-scripts does (the VAE's activations at 1024² take
        about 1 GiB per image in bf16, so a batch of 4 at once would add 3 GiB to the peak)."""
        if batch.get("latents") is not None:
            return batch["latents"].to(ctx.device, torch.float32)
        images = batch["images"]
        n = max(1, int(getattr(ctx.args, "vae_batch_size", 1) or 1))
        chunks = [self.encode_latents(images[i : i + n]) for i in range(0, len(images), n)]
        return torch.cat(chunks).to(ctx.device)

    # ------------------------------------------------------------------ architecture hooks
    @abc.abstractmethod
    def load_models(self, ctx: RunContext) -> None:
        """Load the base model: on the CPU, or straight onto the device where the architecture can (see
        :meth:`prepare_models`, which casts and places whatever is left)."""

    def load_after_cache(self, ctx: RunContext) -> None:  # noqa: B027 - optional hook
        """Load what `load_models` left out so that caching had the device to itself (Anima: the DiT)."""

    @abc.abstractmethod
    def network_targets(self) -> tuple[Any, Any, Any]:
        """``(vae, text_encoder_or_list, unet)`` as passed to ``create_network``."""

    @abc.abstractmethod
    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B,C,h,w) of images (B,3,H,W) in [-1, 1] (the cache format)."""

    @abc.abstractmethod
    def cache(self, ctx: RunContext, data: DatasetInfo) -> None:
        """Cache latents / text-encoder outputs as requested by the flags."""

    @abc.abstractmethod
    def prepare_models(self, ctx: RunContext) -> None:
        """Freeze, cast and move the base models; enable gradient checkpointing."""

    def repeated_blocks(self) -> list[torch.nn.Module]:
        """The repeated transformer blocks that ``--torch_compile`` compiles one by one (regional compile)."""
        return []

    def enable_cuda_graph(self, ctx: RunContext, params: list[torch.nn.Parameter], state_key: Any) -> None:
        """The graph step: route the denoiser call through `library.training.cuda_graph.GraphedCall`."""
        raise NotImplementedError(f"the {type(self).__name__} trainer has no graph step")

    def has_graph_step(self) -> bool:
        """Whether this trainer implements `enable_cuda_graph` (the step-mode decision reads it)."""
        return type(self).enable_cuda_graph is not TrainingArchitecture.enable_cuda_graph

    @abc.abstractmethod
    def per_sample_loss(self, ctx: RunContext, batch: dict[str, Any]) -> torch.Tensor:
        """Loss per sample (B,), already weighted (prior loss weight, min-SNR, ...)."""

    # ------------------------------------------------------------------ samples
    @abc.abstractmethod
    def sample_modules(self) -> list[torch.nn.Module]:
        """Models that sampling needs on the device; they go back where they were afterwards."""

    @abc.abstractmethod
    def generate_sample(self, ctx: RunContext, req: SampleRequest) -> tuple[Image.Image, dict[str, str]]:
        """One image for a request, plus the PNG text keys beyond prompt/negative-prompt/seed/steps/scale."""

    def split_sample_line(self, line: str) -> tuple[str, dict[str, str]]:
        """Cut architecture-only options off a prompt line before the shared parser sees it."""
        return line, {}

    def sample_images(self, ctx: RunContext, prompt_lines: list[str], out_paths: list[Path]) -> list[Path]:
        """One PNG per prompt line at the given base path (``_<seed>`` added when the line has --d)."""
        from library.inference.prompt_options import parse_prompt_line
        from library.io.png_metadata import save_png

        homes = [(mod, next(mod.parameters()).device) for mod in self.sample_modules()]
        for mod, _ in homes:
            mod.to(ctx.device)
        written = []
        try:
            for line, base in zip(prompt_lines, out_paths):
                line, extra = self.split_sample_line(line)
                opts = parse_prompt_line(line)
                req = self._sample_request(ctx, opts, extra)
                image, text = self.generate_sample(ctx, req)
                path = base.with_name(base.name + (f"_{req.seed}" if req.seed is not None else "") + ".png")
                save_png(image, path, {"prompt": req.prompt, "negative-prompt": req.negative_prompt,
                                       "seed": str(req.run_seed), "steps": str(req.steps),
                                       "scale": str(req.scale), **text})  # fmt: skip
                written.append(path)
        finally:
            for mod, home in homes:  # parked models go back (cached TE outputs keep the TEs on the CPU)
                mod.to(home)
        return written

    def _sample_request(self, ctx: RunContext, opts: Any, extra: dict[str, str]) -> SampleRequest:
        mult, low = self.sample_size_multiple, self.sample_min_size
        seed = opts.seeds[0] if opts.seeds else None
        return SampleRequest(
            prompt=opts.prompt,
            negative_prompt=opts.negative_prompt or "",
            width=max(low, ((opts.width or 512) // mult) * mult),
            height=max(low, ((opts.height or 512) // mult) * mult),
            steps=opts.steps or 30,
            scale=opts.scale if opts.scale is not None else 7.5,
            seed=seed,
            # the loop restores the RNG after sampling, so this draw does not shift training
            run_seed=seed if seed is not None else random.randint(0, 2**31 - 1),
            sampler=opts.sampler or getattr(ctx.args, "sample_sampler", None) or "ddim",
            extra=extra,
        )


def compile_repeated_blocks(
    blocks: list[torch.nn.Module], backend: str = "inductor", mode: str | None = None, fullgraph: bool = False
) -> int:
    """Compile each block in place (``Module.compile``: state-dict keys keep their names); returns the count.

    Call it after the network is applied: the blocks' Linear forwards are already patched, so the
    adapters are traced into the block graphs. Blocks of equal shape share one compiled graph. Compiling
    is lazy (first forward); gradient checkpointing re-runs the compiled block in backward.
    """
    if not blocks:
        raise ValueError("--torch_compile: this model has no repeated blocks to compile")
    import torch._dynamo.config as dynamo_config

    # blocks of one shape share a graph; blocks that differ (per-block ranks, widths) each need their own,
    # and past the recompile limit dynamo would silently run the rest eagerly
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, len(blocks))
    options: dict[str, Any] = {"backend": backend, "fullgraph": fullgraph}
    if mode and mode != "default":
        options["mode"] = mode
    for blk in blocks:
        blk.compile(**options)
    return len(blocks)
