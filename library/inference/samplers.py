"""Sampler names of sd-scripts (training samples and gen_img.py) mapped to diffusers schedulers,
all built with SDXL's training schedule (scaled_linear β 0.00085→0.012 over 1000 steps)."""

from __future__ import annotations

import inspect
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

# sd-scripts builds every sampler with these betas and otherwise the class defaults (so images
# match its samples); it also turns clip_sample on where the scheduler has it (DDIM's default)
SDXL_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": True,
}

# name -> (scheduler class, extra init args)
SAMPLERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpm_2": (KDPM2DiscreteScheduler, {}),
    "dpm_2_a": (KDPM2AncestralDiscreteScheduler, {}),
    "dpmsolver": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
    ),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": (DPMSolverSinglestepScheduler, {}),
    # gen_img extras users ask for (A1111/ComfyUI style names)
    "dpmsolver++_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    "dpmsolver++_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
    ),
    "dpmsolver++_sde_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "euler_karras": (EulerDiscreteScheduler, {"use_karras_sigmas": True}),
    "unipc": (UniPCMultistepScheduler, {}),
}
ALIASES: dict[str, str] = {
    "k_lms": "lms",
    "k_euler": "euler",
    "k_euler_a": "euler_a",
    "k_dpm_2": "dpm_2",
    "k_dpm_2_a": "dpm_2_a",
    "dpm++_2m": "dpmsolver++",
    "dpm++_2m_karras": "dpmsolver++_karras",
    "dpm++_2m_sde": "dpmsolver++_sde",
    "dpm++_2m_sde_karras": "dpmsolver++_sde_karras",
    "k_dpmpp_2m": "dpmsolver++",
    "k_dpmpp_2m_karras": "dpmsolver++_karras",
}
TRAIN_SAMPLE_CHOICES = [
    "ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
    "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a",
]  # fmt: skip


def sampler_names() -> list[str]:
    """Every accepted name (canonical names, then aliases)."""
    return list(SAMPLERS) + list(ALIASES)


def make_scheduler(name: str, v_parameterization: bool = False) -> Any:
    """A fresh diffusers scheduler for a sampler name (case-insensitive)."""
    key = str(name).lower()
    key = ALIASES.get(key, key)
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(sampler_names())}")
    cls, extra = SAMPLERS[key]
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in {**SDXL_SCHEDULE, **extra}.items() if k in accepted}
    kwargs["prediction_type"] = "v_prediction" if v_parameterization else "epsilon"
    return cls(**kwargs)
