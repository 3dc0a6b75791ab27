"""Anima's rectified-flow training loss: x_s = (1-s)·x0 + s·n, the DiT predicts v = n - x0.

Timesteps come from `--timestep_sampling`, the loss is weighted by `--weighting_scheme`; the flags arrive
as a typed `FlowLossConfig` built once from the parsed arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from library.training.losses import config_from_args, elementwise_loss


@dataclass(frozen=True)
class FlowLossConfig:
    """The training flags the flow-matching loss reads; defaults are the trainer's flag defaults."""

    timestep_sampling: str = "sigmoid"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 1.0
    weighting_scheme: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    ip_noise_gamma: float | None = None
    loss_type: str = "l2"
    huber_c: float = 0.1

    @classmethod
    def from_args(cls, args: Any) -> FlowLossConfig:
        return config_from_args(cls, args)


def shift_sigmas(s: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * s / (1 + (shift - 1) * s)


def flux_shift_mu(height: int, width: int) -> float:
    """mu linear from 0.5 at 256 tokens to 1.15 at 4096; tokens = (h/2)*(w/2) on the latent grid."""
    tokens = (height // 2) * (width // 2)
    m = (1.15 - 0.5) / (4096 - 256)
    return tokens * m + (0.5 - m * 256)


def density_sample(cfg: FlowLossConfig, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """u in (0,1) from the `--weighting_scheme` density (logit_normal, mode, else uniform)."""
    if cfg.weighting_scheme == "logit_normal":
        return torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(n, generator=generator))
    u = torch.rand(n, generator=generator)
    if cfg.weighting_scheme == "mode":
        return 1 - u - cfg.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def sample_sigmas(
    cfg: FlowLossConfig, batch: int, latent_hw: tuple[int, int], generator: torch.Generator | None = None
) -> torch.Tensor:
    """Training sigmas s in [0,1] (B,) per `--timestep_sampling` (float32, CPU)."""
    mode = cfg.timestep_sampling
    if mode == "uniform":
        return torch.rand(batch, generator=generator)
    if mode == "sigma":
        # index floor(1000u) into a 1000-step flow-matching schedule shifted by S
        # descending like the scheduler's timesteps: u near 0 gives sigma near 1
        table = shift_sigmas(torch.linspace(1.0, 1.0 / 1000, 1000), cfg.discrete_flow_shift)
        idx = (density_sample(cfg, batch, generator) * 1000).long().clamp(0, 999)
        return table[idx]
    s = torch.sigmoid(cfg.sigmoid_scale * torch.randn(batch, generator=generator))
    if mode == "shift":
        s = shift_sigmas(s, cfg.discrete_flow_shift)
    elif mode == "flux_shift":
        mu = math.exp(flux_shift_mu(*latent_hw))
        s = mu / (mu + (1 / s - 1))
    return s


def loss_weighting(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    if scheme == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    return torch.ones_like(sigmas, dtype=torch.float32)


def flow_matching_loss(
    dit: nn.Module,
    latents: torch.Tensor,
    context_fn: Any,
    cfg: FlowLossConfig,
    loss_weights: torch.Tensor,
    weight_dtype: torch.dtype,
    noise: torch.Tensor | None = None,
    sigmas: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample loss (B,) for cached/encoded latents x0 (B,16,h,w); `context_fn()` gives the DiT context."""
    b, _, h, w = latents.shape
    x0 = latents.float()
    n = torch.randn_like(x0) if noise is None else noise.to(x0)
    s = sample_sigmas(cfg, b, (h, w)) if sigmas is None else sigmas
    s = s.to(x0.device, torch.float32)
    loss_weights = loss_weights.to(x0.device)  # uploads before the forward: none after it
    s4 = s.view(-1, 1, 1, 1)
    gamma = cfg.ip_noise_gamma
    noisy_n = n + gamma * torch.randn_like(n) if gamma else n
    x_s = (1 - s4) * x0 + s4 * noisy_n
    t = ((s * 1000).to(weight_dtype) / 1000).to(
        weight_dtype
    )  # the reference rounds t through the weight dtype
    pred = dit(x_s.to(weight_dtype)[:, :, None], t, context_fn())[:, :, 0].float()
    target = n - x0
    loss = elementwise_loss(pred, target, cfg.loss_type, cfg.huber_c)
    loss = loss * loss_weighting(cfg.weighting_scheme, s).view(-1, 1, 1, 1).to(loss.dtype)
    return loss.mean(dim=(1, 2, 3)) * loss_weights.to(loss.dtype)
