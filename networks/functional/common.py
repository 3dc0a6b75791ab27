"""Shared helpers for the pure ΔW maths: applying a bare weight with a layer's own op."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

Scale = float | torch.Tensor


def conv_padded_input(x: torch.Tensor, org_module: nn.Conv2d) -> tuple[torch.Tensor, object]:
    """Return (x, padding) to pass to F.conv2d so non-zero padding modes match the module.

    nn.Conv2d with a non-"zeros" padding_mode pads explicitly and then convolves with padding 0;
    we do the same so a bare ΔW sees exactly the borders the base weight sees.
    """
    if org_module.padding_mode == "zeros":
        return x, org_module.padding
    pad = org_module._reversed_padding_repeated_twice
    return F.pad(x, pad, mode=org_module.padding_mode), 0


def apply_weight(x: torch.Tensor, weight: torch.Tensor, org_module: nn.Module) -> torch.Tensor:
    """Apply `weight` to `x` with `org_module`'s operation (no bias).

    nn.Linear (and subclasses) → F.linear; nn.Conv2d → F.conv2d with the module's
    stride/padding/dilation/groups. A 2-D (O, I) weight on a conv is treated as a 1×1 kernel,
    and a (O, I, 1, 1) weight on a linear layer is flattened.
    """
    if isinstance(org_module, nn.Linear):
        if weight.dim() != 2:
            if weight.dim() == 4 and weight.shape[2:] == (1, 1):
                weight = weight.reshape(weight.shape[0], weight.shape[1])
            else:
                raise ValueError(
                    f"apply_weight: weight of shape {tuple(weight.shape)} cannot be applied by a Linear "
                    "layer; expected (out_features, in_features)"
                )
        return F.linear(x, weight)
    if isinstance(org_module, nn.Conv2d):
        if weight.dim() == 2:
            weight = weight[:, :, None, None]
        if weight.dim() != 4:
            raise ValueError(
                f"apply_weight: weight of shape {tuple(weight.shape)} cannot be applied by a Conv2d layer; "
                "expected (out, in, kh, kw) or (out, in) for a 1x1 conv"
            )
        x, padding = conv_padded_input(x, org_module)
        return F.conv2d(x, weight, None, org_module.stride, padding, org_module.dilation, org_module.groups)
    raise TypeError(
        f"apply_weight: unsupported module type {type(org_module).__name__}; expected nn.Linear or nn.Conv2d"
    )


def scaled_grad(grad: torch.Tensor, scale: Scale) -> torch.Tensor:
    """grad·scale, skipping the multiply for a plain 1.0 (no per-call work when it cannot matter)."""
    if isinstance(scale, torch.Tensor) or scale != 1.0:
        return grad * scale
    return grad


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on x runs in: autocast's when it is on, else x's own."""
    dev = x.device.type
    if dev == "meta":  # torch has no autocast there and raises; shape-only runs compute in x's dtype
        return x.dtype
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def save_autocast_state(ctx, ref: torch.Tensor) -> None:
    """Record the forward's autocast state on a custom Function's ctx.

    Backward then recomputes products in the same precision, as plain autograd of an autocast
    matmul would, instead of silently running them in fp32.
    """
    ctx.device_type = ref.device.type
    ctx.autocast_on = torch.is_autocast_enabled(ctx.device_type)
    ctx.autocast_dtype = torch.get_autocast_dtype(ctx.device_type) if ctx.autocast_on else None


def autocast_like_forward(ctx) -> contextlib.AbstractContextManager:
    """The autocast context recorded by save_autocast_state (a no-op when autocast was off)."""
    if not ctx.autocast_on:
        return contextlib.nullcontext()
    return torch.autocast(ctx.device_type, dtype=ctx.autocast_dtype)
