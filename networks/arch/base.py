"""The `Architecture` record every supported model family provides."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

PathMapper = Callable[[str], str]


def identity_path(path: str) -> str:
    return path


@dataclass(frozen=True)
class Architecture:
    """What the network base needs to know about a model family.

    - `detect_unet(unet)` / `detect_text_encoders(tes)`: class-name based detection.
    - target class names: blocks whose Linear/Conv2d descendants are adapted.
    - `conv_target_classes`: only walked when `conv_dim` is set.
    - `extra_unet_targets(args)`: optional, e.g. Anima's LLM adapter behind `train_llm_adapter`.
    - `unet_path_mapper(unet)` / `te_path_mapper(te)`: model path → the original (file) module path.
    """

    name: str
    detect_unet: Callable[[nn.Module], bool]
    detect_text_encoders: Callable[[Sequence[nn.Module]], bool]
    unet_target_classes: tuple[str, ...]
    conv_target_classes: tuple[str, ...]
    te_target_classes: tuple[str, ...]
    unet_prefix: str = "lora_unet"
    te_prefixes: tuple[str, ...] = ("lora_te1", "lora_te2")
    default_excludes: tuple[str, ...] = ()
    unet_path_mapper: Callable[[nn.Module], PathMapper] = field(default=lambda unet: identity_path)
    te_path_mapper: Callable[[nn.Module], PathMapper] = field(default=lambda te: identity_path)
    extra_unet_targets: Callable[[Any], tuple[str, ...]] = field(default=lambda args: ())
    warn_unsupported: Callable[[Any], None] = field(default=lambda args: None)
