"""Diffusion training maths shared by the SDXL trainer: schedule, noise, timesteps, targets, losses,
SNR reweightings, SDXL size conditioning, and one helper that turns a batch into per-sample losses.

The formulas are sd-scripts', so that the same flags train the same way here: DDPM scaled_linear betas
0.00085→0.012 over 1000 steps, timesteps drawn on the CPU, loss mean over C,H,W then per-sample
weights, then min-SNR and the other SNR-based reweightings.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDPMScheduler

from library.training.losses import LOSS_TYPES, config_from_args, elementwise_loss  # noqa: F401  (re-exported)

HUBER_SCHEDULES = ("constant", "exponential", "snr")
SNR_CLAMP = 1000.0  # SNR-scale helpers clamp SNR so t≈0 stays finite


@dataclass(frozen=True)
class LossConfig:
    """The training flags the SDXL loss reads, typed; defaults are sd-scripts' (flag names alike)."""

    v_parameterization: bool = False
    zero_terminal_snr: bool = False
    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    min_timestep: int = 0
    max_timestep: int = 1000
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    min_snr_gamma: float | None = None
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    debiased_estimation_loss: bool = False

    @classmethod
    def from_args(cls, args: Any) -> LossConfig:
        return config_from_args(cls, args)


def make_noise_scheduler(v_parameterization: bool = False, zero_terminal_snr: bool = False) -> DDPMScheduler:
    """SDXL's training schedule."""
    return DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        prediction_type="v_prediction" if v_parameterization else "epsilon",
        rescale_betas_zero_snr=zero_terminal_snr,
    )


def snr_of(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = ᾱ_t / (1 − ᾱ_t), float32 on the timesteps' device."""
    ac = scheduler.alphas_cumprod.to(torch.float64)[timesteps.cpu().long()]
    return (ac / (1.0 - ac)).float().to(timesteps.device)


def _randn(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return torch.randn(shape, device=like.device, dtype=like.dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)


def _rand(generator: torch.Generator | None) -> float:
    if generator is None:
        return torch.rand(1).item()
    return torch.rand(1, generator=generator, device=generator.device).item()


def pyramid_noise_like(
    noise: torch.Tensor, iterations: int, discount: float = 0.3, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Multi-resolution noise: add upsampled coarser noise levels weighted discount**i, renormalise to unit std."""
    b, c, h, w = noise.shape
    up = torch.nn.Upsample(size=(h, w), mode="bilinear")
    for i in range(iterations):
        r = random.random() * 2 + 2  # random downscale factor in [2, 4)
        wi, hi = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
        noise = noise + up(_randn((b, c, hi, wi), noise, generator)) * discount**i
        if wi == 1 or hi == 1:
            break
    return noise / noise.std()


def sample_noise(
    latents: torch.Tensor,
    noise_offset: float | None = None,
    noise_offset_random_strength: bool = False,
    adaptive_noise_scale: float | None = None,
    multires_noise_iterations: int | None = None,
    multires_noise_discount: float = 0.3,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """ε ~ N(0,1) like latents, with optional offset noise (per sample and channel) or pyramid noise."""
    noise = _randn(tuple(latents.shape), latents, generator)
    if noise_offset:
        offset = noise_offset * _rand(generator) if noise_offset_random_strength else noise_offset
        if adaptive_noise_scale:
            # per-sample/channel offset grows with the latent's mean brightness (never below 0)
            offset = offset + adaptive_noise_scale * latents.mean(dim=(2, 3), keepdim=True).abs()
            offset = offset.clamp(min=0.0)
        noise = noise + offset * _randn((latents.shape[0], latents.shape[1], 1, 1), latents, generator)
    if multires_noise_iterations:  # applied on top of offset noise when both are set
        noise = pyramid_noise_like(noise, multires_noise_iterations, multires_noise_discount, generator)
    return noise


def sample_timesteps(
    batch_size: int, min_timestep: int = 0, max_timestep: int = 1000, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Uniform integer timesteps in [min, max), drawn on the CPU (device-independent RNG stream);
    min == max gives that timestep for every sample."""
    if not 0 <= min_timestep <= max_timestep <= 1000:
        raise ValueError(
            f"need 0 <= min_timestep <= max_timestep <= 1000, got {min_timestep}, {max_timestep}"
        )
    if min_timestep == max_timestep:
        return torch.full((batch_size,), max_timestep, dtype=torch.long)
    return torch.randint(min_timestep, max_timestep, (batch_size,), generator=generator, device="cpu").long()


def add_noise(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """x_t = √ᾱ·x0 + √(1−ᾱ)·ε."""
    return scheduler.add_noise(latents, noise, timesteps.to(latents.device))


def v_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """v = √ᾱ·ε − √(1−ᾱ)·x0."""
    return scheduler.get_velocity(latents, noise, timesteps.to(latents.device))


def huber_c_for(
    scheduler: DDPMScheduler,
    timesteps: torch.Tensor,
    loss_type: str,
    huber_schedule: str = "snr",
    huber_c: float = 0.1,
    huber_scale: float = 1.0,
) -> torch.Tensor | None:
    """Per-sample Huber threshold (B,) for huber/smooth_l1 losses; None for l1/l2."""
    if loss_type not in ("huber", "smooth_l1"):
        return None
    if huber_schedule not in HUBER_SCHEDULES:
        raise ValueError(
            f"--huber_schedule must be one of {', '.join(HUBER_SCHEDULES)}, got {huber_schedule!r}"
        )
    t = timesteps.cpu().double()
    if huber_schedule == "constant":
        c = torch.full_like(t, huber_c)
    elif huber_schedule == "exponential":
        alpha = -math.log(huber_c) / scheduler.config.num_train_timesteps
        c = torch.exp(-alpha * t)
    else:
        ac = scheduler.alphas_cumprod.double()[timesteps.cpu().long()]
        sigma = ((1.0 - ac) / ac).sqrt()
        # sd-scripts applies huber_scale to the constant and exponential schedules only
        return ((1.0 - huber_c) / (1.0 + sigma) ** 2 + huber_c).float().to(timesteps.device)
    return (c * huber_scale).float().to(timesteps.device)


def min_snr_weight(snr: torch.Tensor, gamma: float, v_prediction: bool = False) -> torch.Tensor:
    """min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR+1) for v-prediction."""
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / (snr + 1) if v_prediction else clipped / snr


def scale_v_like_noise_weight(snr: torch.Tensor) -> torch.Tensor:
    s = snr.clamp(max=SNR_CLAMP)
    return s / (s + 1)


def debiased_weight(snr: torch.Tensor) -> torch.Tensor:
    return 1.0 / torch.sqrt(snr.clamp(max=SNR_CLAMP))


def needs_snr(cfg: LossConfig) -> bool:
    """Whether any of the SNR loss options is on (else the per-sample SNR is not computed at all)."""
    return bool(
        cfg.min_snr_gamma
        or cfg.scale_v_pred_loss_like_noise_pred
        or cfg.v_pred_like_loss
        or cfg.debiased_estimation_loss
    )


def apply_snr_weightings(loss: torch.Tensor, snr: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """Per-sample loss (B,) → reweighted by --min_snr_gamma and the other SNR options, in sd-scripts' order."""
    if cfg.min_snr_gamma:
        loss = loss * min_snr_weight(snr, float(cfg.min_snr_gamma), cfg.v_parameterization)
    if cfg.scale_v_pred_loss_like_noise_pred:
        loss = loss * scale_v_like_noise_weight(snr)
    if cfg.v_pred_like_loss:
        loss = loss + loss / scale_v_like_noise_weight(snr) * float(cfg.v_pred_like_loss)
    if cfg.debiased_estimation_loss:
        loss = loss * debiased_weight(snr)
    return loss


def sdxl_time_ids(original_hw: Any, crop_tl: Any, target_hw: Any) -> torch.Tensor:
    """(B, 6) float32 [orig_h, orig_w, crop_top, crop_left, target_h, target_w] (diffusers add_time_ids order).
    Each argument is one (a, b) pair or a batch of them (list of pairs or (B, 2) tensor)."""

    def as_b2(x: Any) -> torch.Tensor:
        t = torch.as_tensor(x, dtype=torch.float32)
        if t.ndim == 1:
            t = t[None]
        if t.ndim != 2 or t.shape[1] != 2:
            raise ValueError(f"size/crop conditioning must be (h, w) pairs, got shape {tuple(t.shape)}")
        return t

    o, c, t = as_b2(original_hw), as_b2(crop_tl), as_b2(target_hw)
    b = max(o.shape[0], c.shape[0], t.shape[0])
    return torch.cat([o.expand(b, 2), c.expand(b, 2), t.expand(b, 2)], dim=1)


def sdxl_training_step_loss(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    context: torch.Tensor,
    pooled: torch.Tensor,
    time_ids: torch.Tensor,
    cfg: LossConfig | None = None,
    noise_scheduler: DDPMScheduler | None = None,
    generator: torch.Generator | None = None,
    loss_weights: torch.Tensor | None = None,
    alpha_mask: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Per-sample loss (B,) for one SDXL batch; latents are already ×0.13025.

    cfg holds the noise, timestep, target and loss flags (None: sd-scripts' defaults).
    `timesteps` fixes t (validation); `dtype` casts the UNet inputs (else the caller's autocast rules).
    The caller averages the result over the batch and back-propagates.
    """
    cfg = cfg or LossConfig()
    sched = noise_scheduler or make_noise_scheduler(cfg.v_parameterization, cfg.zero_terminal_snr)
    b = latents.shape[0]
    noise = sample_noise(
        latents,
        noise_offset=cfg.noise_offset,
        noise_offset_random_strength=cfg.noise_offset_random_strength,
        adaptive_noise_scale=cfg.adaptive_noise_scale,
        multires_noise_iterations=cfg.multires_noise_iterations,
        multires_noise_discount=float(cfg.multires_noise_discount),
        generator=generator,
    )
    if timesteps is None:
        cpu_gen = generator if generator is not None and generator.device.type == "cpu" else None
        timesteps = sample_timesteps(b, int(cfg.min_timestep), int(cfg.max_timestep), cpu_gen)
    # Everything derived from t on the host is made and uploaded before the U-Net is queued: a host read
    # or a blocking upload after it would wait for the whole forward (the step's one read is its loss).
    t_host = timesteps.detach().cpu().long()
    hc = huber_c_for(
        sched, t_host, cfg.loss_type, cfg.huber_schedule, float(cfg.huber_c), float(cfg.huber_scale)
    )
    hc = None if hc is None else hc.to(latents.device)
    snr = snr_of(sched, t_host).to(latents.device) if needs_snr(cfg) else None
    timesteps = t_host.to(latents.device)
    alpha_mask = None if alpha_mask is None else alpha_mask.to(latents.device)
    loss_weights = None if loss_weights is None else loss_weights.to(latents.device)
    gamma = cfg.ip_noise_gamma
    if gamma:
        if cfg.ip_noise_gamma_random_strength:
            gamma = _rand(generator) * gamma
        noisy = add_noise(
            sched, latents, noise + gamma * _randn(tuple(latents.shape), latents, generator), timesteps
        )
    else:
        noisy = add_noise(sched, latents, noise, timesteps)

    cast = (lambda x: x.to(dtype)) if dtype is not None else (lambda x: x)
    pred = unet(
        cast(noisy),
        timesteps,
        cast(context),
        added_cond_kwargs={"text_embeds": cast(pooled), "time_ids": cast(time_ids.to(latents.device))},
    ).sample

    target = v_target(sched, latents, noise, timesteps) if cfg.v_parameterization else noise
    loss = elementwise_loss(pred.float(), target.float(), cfg.loss_type, hc)
    if alpha_mask is not None:
        loss = loss * alpha_mask.to(loss.dtype)
    loss = loss.mean(dim=list(range(1, loss.ndim)))
    if loss_weights is not None:
        loss = loss * loss_weights.to(loss.dtype)
    return loss if snr is None else apply_snr_weightings(loss, snr, cfg)
