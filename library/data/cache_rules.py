"""Which caching flags clash with which per-fetch randomness, checked before any model is loaded.

Works on the parsed dataset group only (its datasets' names and subsets); it reads no files, so the
dataset module can call it while building the group without depending on the cache writer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from .config import DatasetConfigError


class DatasetGroup(Protocol):
    """What the rules read of library.data.dataset.DatasetGroup (which imports this module)."""

    datasets: Sequence[Any]  # each with .name and .subsets (SubsetParams)


logger = logging.getLogger(__name__)


def check_latent_cache_compat(group: DatasetGroup) -> None:
    """sd-scripts refuses latent caching with per-fetch image randomness (colour jitter, random crop)."""
    for d in group.datasets:
        for s in d.subsets:
            for flag in ("color_aug", "random_crop"):
                if getattr(s, flag):
                    raise DatasetConfigError(
                        f"{d.name}, subset {s.image_dir or s.metadata_file}: {flag} cannot be used with "
                        "latent caching (--cache_latents); turn one of them off"
                    )


def check_te_cache_compat(group: DatasetGroup, allow_caption_dropout: bool = False) -> None:
    """Cached text-encoder outputs cannot follow per-fetch caption randomness."""
    for d in group.datasets:
        for s in d.subsets:
            bad = []
            if s.shuffle_caption:
                bad.append("shuffle_caption")
            if s.caption_tag_dropout_rate > 0:
                bad.append("caption_tag_dropout_rate")
            if s.token_warmup_step > 0:
                bad.append("token_warmup_step")
            if not allow_caption_dropout:
                if s.caption_dropout_rate > 0:
                    bad.append("caption_dropout_rate")
                if s.caption_dropout_every_n_epochs > 0:
                    bad.append("caption_dropout_every_n_epochs")
            if bad:
                raise DatasetConfigError(
                    f"{d.name}, subset {s.image_dir or s.metadata_file}: {', '.join(bad)} cannot be used with "
                    "--cache_text_encoder_outputs (the cached caption is fixed)"
                )
            if s.enable_wildcard:
                logger.warning(
                    "%s: enable_wildcard with cached text-encoder outputs: the first line/option is cached",
                    d.name,
                )


def wants_latent_cache(args: Any) -> tuple[bool, bool]:
    """(cache?, to disk?) from sd-scripts flags; `--cache_latents_to_disk` implies `--cache_latents`."""
    to_disk = bool(getattr(args, "cache_latents_to_disk", False))
    return bool(getattr(args, "cache_latents", False)) or to_disk, to_disk


def wants_te_cache(args: Any) -> tuple[bool, bool]:
    to_disk = bool(getattr(args, "cache_text_encoder_outputs_to_disk", False))
    return bool(getattr(args, "cache_text_encoder_outputs", False)) or to_disk, to_disk


def check_cache_args(group: DatasetGroup, args: Any, allow_caption_dropout: bool = False) -> None:
    """Refuse invalid cache/augmentation combinations early (before any model is loaded)."""
    if wants_latent_cache(args)[0]:
        check_latent_cache_compat(group)
    if wants_te_cache(args)[0]:
        check_te_cache_compat(group, allow_caption_dropout)
