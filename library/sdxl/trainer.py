"""The SDXL half of the network trainer: models, dataset, caches, the loss of one batch, samples."""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch
from PIL import Image

from library.training.architecture import DatasetInfo, RunContext, SampleRequest, TrainingArchitecture
from library.training.cuda_graph import GraphedUNet, set_checkpointing_and_modes, training_graph_options
from networks.fp8 import apply_fp8_base, cast_keeping_fp8

logger = logging.getLogger(__name__)

VAE_SCALE = 0.13025
LATENT_CACHE_SUFFIX = "_sdxl"
TE_CACHE_SUFFIX = "_te_outputs"


class SdxlArchitecture(TrainingArchitecture):
    base_model_version = "sdxl_base_v1-0"
    script = "sdxl_train_network.py"
    modelspec_architecture = "stable-diffusion-xl-v1-base"
    bucket_step_multiple = 32

    def __init__(self) -> None:
        super().__init__()
        self.vae_dtype = torch.float32
        self.text_cached = False
        self.max_token_length: int | None = None
        self.noise_scheduler: Any = None
        self.loss_config: Any = None  # LossConfig, built with the noise scheduler from the parsed flags
        self.weight_dtype = torch.float32
        self.graphed_unet: GraphedUNet | None = None

    # ------------------------------------------------------------------ args
    def verify_args(self, args: argparse.Namespace) -> None:
        from library.sdxl.loading import check_sdxl_network_module

        check_sdxl_network_module(args.network_module or "")
        if args.v2:
            raise ValueError("--v2 is an SD2 flag; SDXL training does not use it")
        self.max_token_length = args.max_token_length

    # ------------------------------------------------------------------ models
    def load_models(self, ctx: RunContext) -> None:
        from library.sdxl.loading import load_sdxl_models

        args, weight_dtype = ctx.args, ctx.weight_dtype
        # The stored dtypes are loaded (fp16 in the released files), then each model takes the dtype it had
        # when the whole file was loaded in float32 and cast afterwards, with the same values (fp16/bf16 widen
        # exactly; a cast from them rounds as from their float32 copy): the host never holds a float32 copy
        # of the weights that become fp8 or the U-Net's weight dtype.
        m = self.models = load_sdxl_models(
            args.pretrained_model_name_or_path,
            vae=args.vae,
            tokenizer_dir=args.tokenizer_cache_dir,
            dtype=None,
        )
        # SDXL's VAE makes NaNs in fp16: it stays fp32 under fp16 unless told otherwise (sd-scripts rule)
        self.vae_dtype = (
            torch.float32 if (args.no_half_vae or weight_dtype == torch.float16) else weight_dtype
        )
        wide = [*m.text_encoders, m.vae]
        if args.fp8_base:
            scaled = bool(getattr(args, "fp8_scaled", False))
            n = sum(apply_fp8_base(model, scaled) for model in (m.unet, *m.text_encoders))
            wide.append(m.unet)
            logger.info(
                "--fp8_base: %d Linear/Conv2d weights stored as float8_e4m3fn%s",
                n,
                " with one scale per output channel" if scaled else "",
            )
        elif getattr(args, "base_weights", None):
            wide.append(m.unet)  # merged in float32, rounded once to the weight dtype by prepare_models
        else:
            m.unet.to(weight_dtype)  # what prepare_models casts it to
        for model in wide:
            cast_keeping_fp8(model, "cpu", torch.float32)

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
        """sd-scripts' TE cache keys: hidden_state1 (L×C1), hidden_state2 (L×C2), pool2."""
        context, pooled = self._encode_text(captions, grad=False)
        c1 = self.models.text_encoder_1.config.hidden_size
        return {"hidden_state1": context[..., :c1].float(), "hidden_state2": context[..., c1:].float(),
                "pool2": pooled.float()}  # fmt: skip

    def cache(self, ctx: RunContext, data: DatasetInfo) -> None:
        from library.data import cache_latents, cache_text_encoder_outputs

        m, args, accelerator = self.models, ctx.args, ctx.accelerator
        common = self.cache_kwargs(ctx)
        if args.cache_latents:
            m.vae.to(accelerator.device, self.vae_dtype)
            cache_latents(self.dataset, self.encode_latents, to_disk=args.cache_latents_to_disk,
                          vae_batch_size=args.vae_batch_size, suffix=LATENT_CACHE_SUFFIX, **common)  # fmt: skip
            m.vae.to("cpu")  # the loop needs the VAE again only for samples
        if args.cache_text_encoder_outputs:
            for te in m.text_encoders:
                te.to(accelerator.device)
            # the cached outputs depend on the token length: changing it invalidates the disk cache
            cache_text_encoder_outputs(
                self.dataset, self.encode_text_for_cache, to_disk=args.cache_text_encoder_outputs_to_disk,
                suffix=TE_CACHE_SUFFIX, settings=f"max_token_length={args.max_token_length}", **common,
            )  # fmt: skip
            self.text_cached = True  # prepare_models parks the encoders on the CPU
        accelerator.wait_for_everyone()

    def prepare_models(self, ctx: RunContext) -> None:
        m, args, device, weight_dtype = self.models, ctx.args, ctx.device, ctx.weight_dtype
        self.weight_dtype = weight_dtype
        for model in (m.unet, *m.text_encoders):
            model.requires_grad_(False)
        # the frozen base runs in the mixed-precision dtype; fp8 weights stay fp8
        # cached TE outputs: the encoders wait on the CPU (only samples need them) to save device memory
        te_device = "cpu" if self.text_cached else device
        if args.fp8_base:
            m.unet.to(device)
            for te in m.text_encoders:
                te.to(te_device)
        else:
            m.unet.to(device, weight_dtype)
            for te in m.text_encoders:
                te.to(te_device, weight_dtype)
        if not args.cache_latents:
            m.vae.to(device, self.vae_dtype)
        set_checkpointing_and_modes(
            m.unet, m.text_encoders, gradient_checkpointing=bool(args.gradient_checkpointing),
            graph_step=ctx.graph_step, train_text_encoder=ctx.train_text_encoder,
        )  # fmt: skip
        m.vae.eval()

    def repeated_blocks(self) -> list[torch.nn.Module]:
        """The U-Net's ``BasicTransformerBlock``s (70 in SDXL): attention + FF, every adapted Linear."""
        from diffusers.models.attention import BasicTransformerBlock

        return [m for m in self.models.unet.modules() if isinstance(m, BasicTransformerBlock)]

    def enable_cuda_graph(self, ctx: RunContext, params: list[torch.nn.Parameter], state_key: Any) -> None:
        self.graphed_unet = GraphedUNet(self.models.unet, params, state_key, **training_graph_options(ctx))

    # ------------------------------------------------------------------ loss
    def _encode_text(self, captions: list[str], grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        from library.sdxl.text import encode_sdxl_text, tokenize_sdxl

        m = self.models
        ids1, ids2 = tokenize_sdxl(m, captions, self.max_token_length)
        with torch.set_grad_enabled(grad):
            return encode_sdxl_text(m, ids1, ids2)

    def per_sample_loss(self, ctx: RunContext, batch: dict[str, Any]) -> torch.Tensor:
        from library.sdxl.loss import (
            LossConfig,
            make_noise_scheduler,
            sdxl_time_ids,
            sdxl_training_step_loss,
        )

        args, device, weight_dtype = ctx.args, ctx.device, ctx.weight_dtype
        if self.noise_scheduler is None:
            self.noise_scheduler = make_noise_scheduler(args.v_parameterization, args.zero_terminal_snr)
            self.loss_config = LossConfig.from_args(args)
        latents = self.batch_latents(ctx, batch) * VAE_SCALE
        te_out = batch.get("text_encoder_outputs")
        if te_out is not None:
            context = torch.cat([te_out["hidden_state1"], te_out["hidden_state2"]], dim=2).to(device)
            pooled = te_out["pool2"].to(device)
        else:
            context, pooled = self._encode_text(batch["captions"], grad=ctx.train_text_encoder)
        time_ids = sdxl_time_ids(
            batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"]
        )
        return sdxl_training_step_loss(
            self.graphed_unet or self.models.unet, latents, context.to(weight_dtype), pooled.to(weight_dtype),
            time_ids.to(device, weight_dtype), self.loss_config, noise_scheduler=self.noise_scheduler,
            loss_weights=batch["loss_weights"].to(device),
        )  # fmt: skip

    # ------------------------------------------------------------------ samples
    def sample_modules(self) -> list[torch.nn.Module]:
        return [self.models.vae, *self.models.text_encoders]

    def generate_sample(self, ctx: RunContext, req: SampleRequest) -> tuple[Image.Image, dict[str, str]]:
        """sd-scripts sample rules (sizes floored to /8); the sampler comes from --ss or --sample_sampler."""
        from library.sdxl.generate import generate_sdxl

        args = ctx.args
        image = generate_sdxl(
            self.models, [req.prompt], [req.negative_prompt], req.width, req.height, req.steps, req.scale,
            [req.run_seed], req.sampler, dtype=self.weight_dtype, device=ctx.device,
            max_token_length=args.max_token_length, v_parameterization=args.v_parameterization,
        )[0]  # fmt: skip
        self.models.vae.to(self.vae_dtype)
        return image, {"sampler": req.sampler}
