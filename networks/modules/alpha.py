"""α, the scale s = α/r and the optional trained σ of an adapter.

α = 0 and a missing α both mean "α = r" (s = 1): ComfyUI renders an α = 0 file as no change at all, so a
literal 0 would make a file that trains but does nothing elsewhere. `alpha_or_rank` and `file_alpha` are the
only places that apply that rule.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def alpha_or_rank(alpha: float | None, rank: int) -> float:
    """α for a new module: None or 0 → r."""
    return float(rank) if alpha is None or alpha == 0 else float(alpha)


def file_alpha(lora_name: str, tensors: dict[str, torch.Tensor], rank: int) -> float:
    """α from a file: missing → r (s = 1); 0 → r with a warning (ComfyUI would render nothing)."""
    t = tensors.get("alpha")
    if t is None:
        return float(rank)
    a = float(t.float())
    if a == 0.0:
        logger.warning("%s.alpha is 0; treating it as the rank %d", lora_name, rank)
        return float(rank)
    return a


class AlphaMixin:
    """α (a 0-d fp32 buffer, saved), s = α/r, and σ (`use_scalar`: a trained 0-d factor on s)."""

    alpha_value: float
    scale: float
    rank: int
    scalar: nn.Parameter | None

    def _init_alpha(self) -> None:
        self.alpha_value = 1.0
        self.scale = 1.0
        self.rank = 0
        self.scalar = None

    def _set_alpha(self, alpha: float, rank: int, scale: float) -> None:
        self.alpha_value = float(alpha)
        self.rank = int(rank)
        self.scale = float(scale)
        if "alpha" in self._buffers:
            self.alpha.fill_(self.alpha_value)
        else:
            self.register_buffer(
                "alpha", torch.tensor(self.alpha_value, dtype=torch.float32, device=self._init_device())
            )

    def _enable_scalar(self) -> None:
        self.scalar = nn.Parameter(torch.zeros((), dtype=torch.float32, device=self._init_device()))

    def alpha_is_ignored(self) -> bool:
        """True where the layout fixes s = 1 whatever α says (LoKr with both factors full)."""
        return False

    def total_scale(self, multiplier: float) -> float | torch.Tensor:
        """m·s, times σ when it is trained (then a 0-d tensor)."""
        s = self.scale * multiplier
        if self.scalar is not None:
            return self.scalar * s
        return s
