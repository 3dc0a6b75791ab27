"""The SDXL half of the network trainer: models, dataset, caches, the loss of one batch, samples."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from library.train_loop import DatasetInfo, TrainingArchitecture
from library.train_utils import apply_fp8_base

logger = logging.getLogger(__name__)

VAE_SCALE = 0.13025
LATENT_CACHE_SUFFIX = "_sdxl"
TE_CACHE_SUFFIX = "_te_outputs"


class SdxlArchitecture(TrainingArchitecture):
    base_model_version = "sdxl_base_v1-0"
    modelspec_architecture = "stable-diffusion-xl-v1-base"

    def __init__(self) -> None:
        self.models: Any = None
        self.dataset: Any = None
        self.vae_dtype = torch.float32
        self.text_cached = False
        self.max_token_length: int | None = None

    # ------------------------------------------------------------------ args
    def verify_args(self, args: argparse.Namespace) -> None:
        if args.v2:
            raise ValueError("--v2 is an SD2 flag; SDXL training does not use it")
        self.max_token_length = args.max_token_length

    # ------------------------------------------------------------------ data
    def build_dataset(self, args: argparse.Namespace) -> DatasetInfo:
        from library import dataset as ds

        self.dataset = ds.build_dataset_from_args(args)
        return DatasetInfo(
            dataset=self.dataset,
            collate_fn=ds.collate_unwrap,
            num_train_images=self.dataset.num_train_images,
            num_reg_images=self.dataset.num_reg_images,
            metadata=ds.dataset_metadata(self.dataset, args),
            set_epoch=self.dataset.set_current_epoch,
        )

    # ------------------------------------------------------------------ models
    def load_models(
        self, args: argparse.Namespace, accelerator: Accelerator, weight_dtype: torch.dtype
    ) -> None:
        from library.sdxl_models import load_sdxl_models

        self.models = load_sdxl_models(
            args.pretrained_model_name_or_path, vae=args.vae, tokenizer_dir=args.tokenizer_cache_dir
        )
        # SDXL's VAE makes NaNs in fp16: it stays fp32 under fp16 unless told otherwise (sd-scripts rule)
        self.vae_dtype = (
            torch.float32 if (args.no_half_vae or weight_dtype == torch.float16) else weight_dtype
        )
        if args.fp8_base:
            n = apply_fp8_base(self.models.unet)
            for te in self.models.text_encoders:
                n += apply_fp8_base(te)
            logger.info("--fp8_base: %d Linear/Conv2d weights stored as float8_e4m3fn", n)

    def network_targets(self) -> tuple[Any, Any, Any]:
        m = self.models
        return m.vae, [m.text_encoder_1, m.text_encoder_2], m.unet

    # ------------------------------------------------------------------ caching
    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Unscaled posterior sample (the cache format); NaNs become 0."""
        vae = self.models.vae
        with torch.no_grad():
            dist = vae.encode(images.to(vae.device, self.vae_dtype)).latent_dist
            latents = dist.sample().float()
        return torch.nan_to_num(latents, nan=0.0)

    def encode_text_for_cache(self, captions: list[str]) -> dict[str, torch.Tensor]:
        hidden1, hidden2, pool2 = self._encode_text(captions, grad=False)
        return {"hidden_state1": hidden1.float(), "hidden_state2": hidden2.float(), "pool2": pool2.float()}

    def cache(
        self, args: argparse.Namespace, accelerator: Accelerator, data: DatasetInfo, weight_dtype: torch.dtype
    ) -> None:
        m = self.models
        if args.cache_latents:
            m.vae.to(accelerator.device, self.vae_dtype)
            self.dataset.cache_latents(self.encode_latents, accelerator=accelerator)
            m.vae.to("cpu")  # freed from the device: the loop no longer needs it except for samples
        if args.cache_text_encoder_outputs:
            for te in m.text_encoders:
                te.to(accelerator.device, weight_dtype if not args.fp8_base else None)
            self.dataset.cache_text_encoder_outputs(self.encode_text_for_cache, accelerator=accelerator)
            self.text_cached = True
        accelerator.wait_for_everyone()

    def prepare_models(
        self,
        args: argparse.Namespace,
        accelerator: Accelerator,
        weight_dtype: torch.dtype,
        train_unet: bool,
        train_text_encoder: bool,
    ) -> None:
        m = self.models
        device = accelerator.device
        for model in (m.unet, *m.text_encoders):
            model.requires_grad_(False)
        # the frozen base runs in the mixed-precision dtype; fp8 weights stay fp8
        if args.fp8_base:
            m.unet.to(device)
            for te in m.text_encoders:
                te.to(device)
        else:
            m.unet.to(device, weight_dtype)
            for te in m.text_encoders:
                te.to(device, weight_dtype)
        if not args.cache_latents:
            m.vae.to(device, self.vae_dtype)
        if args.gradient_checkpointing:
            m.unet.enable_gradient_checkpointing()
            if train_text_encoder:
                for te in m.text_encoders:
                    te.gradient_checkpointing_enable()
        # dropout in the frozen models would make the loss noisy; training mode only for checkpointing
        m.unet.train(args.gradient_checkpointing)
        for te in m.text_encoders:
            te.train(args.gradient_checkpointing and train_text_encoder)
        m.vae.eval()

    # ------------------------------------------------------------------ loss
    def _encode_text(
        self, captions: list[str], grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from library.sdxl_text import encode_sdxl_text_parts, tokenize_sdxl

        m = self.models
        ids1, ids2 = tokenize_sdxl(m.tokenizers, captions, self.max_token_length)
        device = m.text_encoder_1.device
        with torch.set_grad_enabled(grad):
            return encode_sdxl_text_parts(m.text_encoders, ids1.to(device), ids2.to(device))

    def per_sample_loss(
        self,
        args: argparse.Namespace,
        accelerator: Accelerator,
        batch: dict[str, Any],
        weight_dtype: torch.dtype,
        train_text_encoder: bool,
    ) -> torch.Tensor:
        from library.diffusion_loss import sdxl_time_ids, sdxl_training_step_loss

        device = accelerator.device
        if batch.get("latents") is not None:
            latents = batch["latents"].to(device, torch.float32)
        else:
            latents = self.encode_latents(batch["images"])
        latents = latents * VAE_SCALE
        if batch.get("hidden_state1") is not None:
            hidden1 = batch["hidden_state1"].to(device)
            hidden2 = batch["hidden_state2"].to(device)
            pooled = batch["pool2"].to(device)
        else:
            hidden1, hidden2, pooled = self._encode_text(batch["captions"], grad=train_text_encoder)
        context = torch.cat([hidden1, hidden2], dim=2).to(weight_dtype)
        time_ids = sdxl_time_ids(
            batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"]
        )
        weights = batch["loss_weights"].to(device, torch.float32)
        return sdxl_training_step_loss(
            self.models.unet, latents, context, pooled.to(weight_dtype), time_ids.to(device, weight_dtype),
            args, loss_weights=weights,
        )  # fmt: skip

    # ------------------------------------------------------------------ samples
    def sample_images(
        self,
        args: argparse.Namespace,
        accelerator: Accelerator,
        prompt_lines: list[str],
        out_paths: list[Path],
    ) -> list[Path]:
        from library.png_metadata import save_png
        from library.prompt_options import parse_prompt_line
        from library.sdxl_generate import generate_sdxl

        m = self.models
        vae_device = m.vae.device
        m.vae.to(accelerator.device, self.vae_dtype)
        written = []
        dtype = torch.float32 if args.mixed_precision == "no" else torch.bfloat16
        for line, base in zip(prompt_lines, out_paths):
            opts = parse_prompt_line(line)
            width = ((opts.width or 512) // 8) * 8
            height = ((opts.height or 512) // 8) * 8
            seed = opts.seeds[0] if opts.seeds else None
            run_seed = seed if seed is not None else torch.randint(0, 2**31 - 1, (1,)).item()
            image = generate_sdxl(
                m, [opts.prompt], [opts.negative_prompt or ""], width, height, opts.steps or 30,
                opts.scale if opts.scale is not None else 7.5, [run_seed], opts.sampler or args.sample_sampler,
                dtype=dtype, device=accelerator.device,
            )[0]  # fmt: skip
            path = base.with_name(base.name + (f"_{seed}" if seed is not None else "") + ".png")
            save_png(image, path, {"prompt": opts.prompt, "negative-prompt": opts.negative_prompt or "",
                                   "seed": str(run_seed), "steps": str(opts.steps or 30)})  # fmt: skip
            written.append(path)
        m.vae.to(vae_device)
        return written
