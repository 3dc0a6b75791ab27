"""Pieces both trainers' losses share: the unreduced loss by `--loss_type`, and typed loss configs from
the parsed flags."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
T = TypeVar("T")


def config_from_args(cls: type[T], args: Any) -> T:
    """A frozen config dataclass from a parsed namespace: absent flags, and None (argparse's unset), keep
    the field's default; given values pass through."""
    values = {}
    for f in fields(cls):  # type: ignore[arg-type]
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return cls(**values)


def elementwise_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    loss_type: str = "l2",
    huber_c: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Unreduced loss: l2 (squared error), l1, pseudo-Huber (×2c) or smooth-L1 (pseudo-Huber ×2). `huber_c`
    is one value or one per sample."""
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if loss_type in ("huber", "smooth_l1"):
        if huber_c is None:
            raise ValueError(f"loss_type {loss_type} needs huber_c")
        # a per-sample tensor comes on pred's device (made before the forward); a number becomes a fill
        if isinstance(huber_c, torch.Tensor):
            c = huber_c.view(-1, *([1] * (pred.ndim - 1))).to(pred.dtype)
        else:
            c = torch.full((1,) * pred.ndim, float(huber_c), dtype=pred.dtype, device=pred.device)
        core = torch.sqrt((pred - target) ** 2 + c**2) - c
        return 2 * c * core if loss_type == "huber" else 2 * core
    raise ValueError(f"--loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
