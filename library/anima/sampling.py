"""Anima flow-matching Euler sampler with a shifted sigma schedule and CFG (the reference inference script's).

Used by `anima_minimal_inference.py` and by the trainer's sample images.
diffusers' FlowMatchEulerDiscreteScheduler is not used on purpose: its timesteps differ.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

LATENT_CHANNELS = 16
SIZE_MULTIPLE = 16  # VAE /8 and patch 2 -> pixel sizes must be multiples of 16


def check_image_size(height: int, width: int, flag: str = "--image_size") -> None:
    """Clear error unless both sides are positive multiples of 16."""
    for name, v in (("height", height), ("width", width)):
        if v <= 0 or v % SIZE_MULTIPLE:
            raise ValueError(
                f"{flag}: {name} {v} is not a positive multiple of {SIZE_MULTIPLE} "
                f"(the VAE downsamples by 8 and the DiT patch is 2); try {max(16, v // 16 * 16)}"
            )


def shift_sigma(s: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """s <- S*s / (1 + (S-1)*s); S = 1 is the identity."""
    return shift * s / (1 + (shift - 1) * s)


def shifted_sigmas(steps: int, shift: float) -> torch.Tensor:
    """steps+1 sigmas from 1 to 0 (fp32), shifted."""
    if steps < 1:
        raise ValueError(f"--infer_steps must be >= 1, got {steps}")
    return shift_sigma(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32), float(shift))


def initial_noise(height: int, width: int, seed: int, dtype: torch.dtype, batch: int = 1) -> torch.Tensor:
    """Noise (B,16,1,H/8,W/8) drawn in fp32 on the CPU from `seed`, so it is device independent."""
    gen = torch.Generator("cpu").manual_seed(int(seed))
    shape = (batch, LATENT_CHANNELS, 1, height // 8, width // 8)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)


VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def euler_sample(
    dit: VelocityFn,
    noise: torch.Tensor,
    context: torch.Tensor,
    neg_context: torch.Tensor | None,
    steps: int,
    guidance_scale: float,
    flow_shift: float,
    use_cfg: bool | None = None,
    progress: bool = False,
    progress_desc: str = "sampling",
) -> torch.Tensor:
    """Integrate the velocity field from sigma 1 to 0; returns latents in noise's dtype.

    CFG (two separate passes) runs when `use_cfg` is True, or by default when guidance != 1.
    The update x <- x - (s_i - s_{i+1})*v is done in fp32 and cast back each step.
    """
    if use_cfg is None:
        use_cfg = guidance_scale != 1.0
    if use_cfg and neg_context is None:
        raise ValueError("CFG needs a negative-prompt context")
    dtype = noise.dtype
    sigmas = shifted_sigmas(steps, flow_shift)
    x = noise
    b = x.shape[0]
    for i in tqdm(range(steps), disable=not progress, desc=progress_desc, unit="step"):
        t = torch.full((b,), float(sigmas[i]), device=x.device, dtype=dtype)
        v = dit(x, t, context).float()
        if use_cfg:
            v_u = dit(x, t, neg_context).float()
            v = v_u + guidance_scale * (v - v_u)
        x = (x.float() - (sigmas[i] - sigmas[i + 1]).item() * v).to(dtype)
    return x


def latents_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Decoded images in [-1,1], (B,3,H,W) or (B,3,1,H,W) -> PIL (uint8 = (x+1)*127.5)."""
    if images.ndim == 5:
        images = images[:, :, 0]
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]
