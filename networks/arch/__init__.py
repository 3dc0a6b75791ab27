"""Architecture registry: which model classes are targeted and how module paths are named.

An architecture is a small `Architecture` object (see `base.py`); adding one is one line in
`ARCHITECTURES`. Detection is by class names (never by "any class called Block"), and a model that no
architecture recognises is an error listing what was seen.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .anima import ANIMA
from .base import Architecture, identity_path
from .sdxl import SDXL

ARCHITECTURES: list[Architecture] = [SDXL, ANIMA]

__all__ = ["ARCHITECTURES", "Architecture", "detect_architecture", "identity_path"]


def detect_architecture(text_encoders: Sequence[nn.Module | None], unet: nn.Module | None) -> Architecture:
    """Return the architecture of (text encoders, U-Net/DiT); the U-Net decides when present."""
    tes = [t for t in text_encoders if t is not None]
    if unet is not None:
        for arch in ARCHITECTURES:
            if arch.detect_unet(unet):
                return arch
        raise ValueError(
            f"unet: model class {type(unet).__name__} is not a supported architecture "
            f"(supported: {', '.join(a.name for a in ARCHITECTURES)}); child classes seen: "
            f"{sorted({type(m).__name__ for m in unet.children()})}"
        )
    if not tes:
        raise ValueError("text_encoder and unet: both are None; nothing to attach a network to")
    for arch in ARCHITECTURES:
        if arch.detect_text_encoders(tes):
            return arch
    raise ValueError(
        f"text_encoder: classes {[type(t).__name__ for t in tes]} match no supported architecture "
        f"({', '.join(a.name for a in ARCHITECTURES)})"
    )
