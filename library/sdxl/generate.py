"""SDXL image generation from loaded components, shared by training samples and gen_img.py.

Built on diffusers' StableDiffusionXLPipeline, but prompts are encoded with our own
`library.sdxl.text` (the exact training-time encoding), and every image gets its own
torch.Generator seeded from its seed, for the start latents and for ancestral/SDE step noise,
so an image does not depend on its batch position. The UNet is called through its normal
forward, so networks applied by patching Linear/Conv forwards take effect.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from library.inference.samplers import make_scheduler
from library.sdxl.text import encode_prompts


def _check_size(width: int, height: int, models: Any) -> None:
    vae_factor = 2 ** (len(models.vae.config.block_out_channels) - 1)
    unet_factor = 2 ** (len(models.unet.config.block_out_channels) - 1)
    step = vae_factor * unet_factor
    if width <= 0 or height <= 0 or width % step or height % step:
        raise ValueError(f"image size {width}x{height} must be positive multiples of {step} for this model")


def make_pipeline(
    models: Any, sampler: str = "euler_a", v_parameterization: bool = False
) -> StableDiffusionXLPipeline:
    """A diffusers SDXL pipeline sharing our modules (no copies, no watermark)."""
    return StableDiffusionXLPipeline(
        vae=models.vae,
        text_encoder=models.text_encoder_1,
        text_encoder_2=models.text_encoder_2,
        tokenizer=models.tokenizer_1,
        tokenizer_2=models.tokenizer_2,
        unet=models.unet,
        scheduler=make_scheduler(sampler, v_parameterization),
        add_watermarker=False,
    )


def initial_latents(
    seeds: Sequence[int], channels: int, height: int, width: int, factor: int = 8
) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Start noise (B, C, H/f, W/f), one CPU generator per seed (kept for step noise)."""
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    lat = torch.cat(
        [torch.randn((1, channels, height // factor, width // factor), generator=g) for g in gens]
    )
    return lat, gens


def generate_sdxl(
    models: Any,
    prompts: Sequence[str],
    negative_prompts: Sequence[str] | None = None,
    width: int = 1024,
    height: int = 1024,
    steps: int = 30,
    guidance_scale: float = 7.5,
    seeds: Sequence[int] | None = None,
    sampler: str = "euler_a",
    original_size: tuple[int, int] | None = None,
    crop_top_left: tuple[int, int] = (0, 0),
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    max_token_length: int | None = None,
    v_parameterization: bool = False,
    negative_original_size: tuple[int, int] | None = None,
    show_progress: bool = False,
    output_type: str = "pil",
    emb_normalize_mode: str | None = None,
    progress_desc: str = "sampling",
) -> list[Image.Image] | torch.Tensor:
    """One image per prompt; sizes are (h, w) pairs as in sd-scripts (original defaults to the target).

    emb_normalize_mode None encodes prompts as plain text (training samples); "original" | "abs" |
    "none" parse "(text:1.2)" weights as gen_img does. Returns PIL images (or the final latents
    with output_type="latent")."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("generate_sdxl needs at least one prompt")
    negative_prompts = list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)
    seeds = list(seeds) if seeds is not None else list(range(len(prompts)))
    if len(negative_prompts) != len(prompts) or len(seeds) != len(prompts):
        raise ValueError(
            f"prompts ({len(prompts)}), negative_prompts ({len(negative_prompts)}) and seeds ({len(seeds)}) "
            "must have the same length"
        )
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if sampler.lower() == "pndm" and steps < 4:  # its Runge-Kutta warm-up needs 4 steps
        raise ValueError(f"sampler pndm needs steps >= 4, got {steps}")
    _check_size(width, height, models)
    device = torch.device(device)
    # the components run on `device` for this call and go back where they were afterwards (a trainer
    # may keep cached-away text encoders or the VAE on the CPU between samples)
    modules = (models.unet, models.vae, models.text_encoder_1, models.text_encoder_2)
    homes = [next(m.parameters()).device for m in modules]
    try:
        for m in modules:
            m.to(device)
        return _generate_on_device(
            models, prompts, negative_prompts, width, height, steps, guidance_scale, seeds, sampler,
            original_size, crop_top_left, dtype, device, max_token_length, v_parameterization,
            negative_original_size, (show_progress, progress_desc), output_type, emb_normalize_mode,
        )  # fmt: skip
    finally:
        for m, home in zip(modules, homes):
            if home != device:
                m.to(home)


def _generate_on_device(
    models: Any,
    prompts: list[str],
    negative_prompts: list[str],
    width: int,
    height: int,
    steps: int,
    guidance_scale: float,
    seeds: list[int],
    sampler: str,
    original_size: tuple[int, int] | None,
    crop_top_left: tuple[int, int],
    dtype: torch.dtype,
    device: torch.device,
    max_token_length: int | None,
    v_parameterization: bool,
    negative_original_size: tuple[int, int] | None,
    progress: tuple[bool, str],
    output_type: str,
    emb_normalize_mode: str | None,
) -> list[Image.Image] | torch.Tensor:
    pipe = make_pipeline(models, sampler, v_parameterization)
    pipe.set_progress_bar_config(disable=not progress[0], desc=progress[1])
    with torch.no_grad():
        ctx, pooled = encode_prompts(models, prompts, max_token_length, device, dtype, emb_normalize_mode)
        nctx, npooled = encode_prompts(
            models, negative_prompts, max_token_length, device, dtype, emb_normalize_mode
        )
    factor = pipe.vae_scale_factor
    latents, gens = initial_latents(seeds, models.unet.config.in_channels, height, width, factor)
    size = (height, width)
    orig = tuple(original_size) if original_size is not None else size
    # weights stored in another dtype than requested (fp8 base, fp32 weights with bf16 asked) run
    # under autocast, the way training computes them
    unet_dtype = next(models.unet.parameters()).dtype
    use_autocast = dtype != torch.float32 and unet_dtype != dtype
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=use_autocast):
        out = pipe(
            prompt_embeds=ctx,
            pooled_prompt_embeds=pooled,
            negative_prompt_embeds=nctx,
            negative_pooled_prompt_embeds=npooled,
            width=width,
            height=height,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=gens,
            latents=latents.to(device=device, dtype=dtype),
            original_size=orig,
            crops_coords_top_left=tuple(crop_top_left),
            target_size=size,
            negative_original_size=tuple(negative_original_size) if negative_original_size else orig,
            negative_crops_coords_top_left=tuple(crop_top_left),
            negative_target_size=size,
            output_type="latent",
        )
    if output_type == "latent":
        return out.images
    return decode_latents(models.vae, out.images)


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor) -> list[Image.Image]:
    """Latents -> PIL in the VAE's own dtype (it may differ from the UNet's, e.g. --no_half_vae);
    an fp16 VAE with force_upcast decodes in fp32, as the SDXL VAE overflows in fp16."""
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        x = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor
        images = vae.decode(x).sample
    finally:
        if upcast:
            vae.to(torch.float16)
    return VaeImageProcessor(vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1)).postprocess(
        images.float(), output_type="pil"
    )
