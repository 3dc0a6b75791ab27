"""Which layers of a model a network adapts, and the names they get in files.

A model part (text encoder, U-Net/DiT) is a `Root`; its adapted layers are the Linear/Conv2d leaves under
the architecture's target classes, named `<prefix>_<original dotted path with _>`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from networks.arch import Architecture
from networks.modules.adapter import SUPPORTED_LEAVES
from networks.network_args import NetworkArgs


@dataclass
class Root:
    """One model part a network attaches to: a text encoder (te_index ≥ 0) or the U-Net/DiT (None)."""

    module: nn.Module
    prefix: str
    te_index: int | None
    path_mapper: Any
    target_classes: tuple[str, ...]


def unwrap_model(model: Any) -> Any:
    """The bare model under torch.compile (`_orig_mod`) or DDP/FSDP-style (`module`) wrappers."""
    while model is not None:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif type(model).__name__ in ("DistributedDataParallel", "DataParallel") and isinstance(
            getattr(model, "module", None), nn.Module
        ):
            model = model.module
        else:
            break
    return model


def as_te_list(text_encoder: Any) -> list[nn.Module | None]:
    if text_encoder is None:
        return []
    if isinstance(text_encoder, (list, tuple)):
        return [unwrap_model(t) for t in text_encoder]
    return [unwrap_model(text_encoder)]


def model_roots(
    arch: Architecture,
    text_encoders: Sequence[nn.Module | None],
    unet: nn.Module | None,
    args: NetworkArgs | None,
) -> list[Root]:
    """TE roots first (file prefix by position), then the U-Net/DiT."""
    if len(text_encoders) > len(arch.te_prefixes):
        raise ValueError(
            f"text_encoder: {len(text_encoders)} text encoders given, but {arch.name} has "
            f"{len(arch.te_prefixes)} ({', '.join(arch.te_prefixes)})"
        )
    roots: list[Root] = []
    for i, te in enumerate(text_encoders):
        if te is not None:
            roots.append(Root(te, arch.te_prefixes[i], i, arch.te_path_mapper(te), arch.te_target_classes))
    if unet is not None:
        targets = arch.unet_target_classes
        if args is not None:
            targets = targets + tuple(arch.extra_unet_targets(args))
            if args.conv_dim is not None:
                targets = targets + arch.conv_target_classes
        roots.append(Root(unet, arch.unet_prefix, None, arch.unet_path_mapper(unet), targets))
    return roots


def iter_target_leaves(root: Root) -> list[tuple[str, nn.Module]]:
    """(original dotted path, leaf) of Linear/Conv2d leaves under target-class blocks, deduplicated."""
    seen: set[int] = set()
    out: list[tuple[str, nn.Module]] = []
    for name, block in root.module.named_modules():
        if type(block).__name__ not in root.target_classes:
            continue
        for child_name, leaf in block.named_modules():
            if not isinstance(leaf, SUPPORTED_LEAVES) or id(leaf) in seen:
                continue
            seen.add(id(leaf))
            path = ".".join(p for p in (name, child_name) if p)
            out.append((root.path_mapper(path), leaf))
    return out


def iter_all_leaves(root: Root) -> list[tuple[str, str, nn.Module]]:
    """(original path, model path, leaf) for every Linear/Conv2d of a root (files made with wider
    presets, e.g. LyCORIS, may adapt layers outside our default targets)."""
    out = []
    for path, leaf in root.module.named_modules():
        if isinstance(leaf, SUPPORTED_LEAVES):
            try:
                out.append((root.path_mapper(path), path, leaf))
            except ValueError:
                continue  # a layer with no original-name equivalent cannot be in a file
    return out


def lora_name_of(prefix: str, original_name: str) -> str:
    return prefix + "_" + original_name.replace(".", "_")


def _fullmatch_any(patterns: Sequence[re.Pattern[str]], name: str) -> bool:
    return any(p.fullmatch(name) for p in patterns)
