"""Caption reading and per-fetch caption processing with sd-scripts' rules (docs/dataset_config.md)."""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .config import SubsetParams

_WILDCARD = re.compile(r"\{([^}]+)\}")


@dataclass
class CaptionOptions:
    """The subset settings that shape a caption at fetch time."""

    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_separator: str = ","
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str | None = None
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0


def read_caption_file(image_path: Path, caption_extension: str, enable_wildcard: bool) -> str | None:
    """Caption from `<stem><ext>` next to the image: first line, or all non-empty lines with wildcards.

    Returns None when there is no caption file. An empty caption file is an error (as in sd-scripts),
    because it almost always means a broken export.
    """
    cap_path = image_path.with_name(image_path.stem + caption_extension)
    if not cap_path.is_file():
        return None
    try:
        # utf-8-sig drops a byte-order mark (Windows editors write one); it would glue to the first tag
        lines = cap_path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"caption file {cap_path} cannot be read as UTF-8 text: {e}") from e
    if not lines:
        raise ValueError(f"caption file {cap_path} is empty; expected at least one line of text")
    if enable_wildcard:
        return "\n".join(line.strip() for line in lines if line.strip())
    return lines[0].strip()


def add_prefix_suffix(caption: str, opts: CaptionOptions) -> str:
    if opts.caption_prefix:
        caption = opts.caption_prefix + " " + caption
    if opts.caption_suffix:
        caption = caption + " " + opts.caption_suffix
    return caption


def _split_tags(text: str, sep: str) -> list[str]:
    return [t.strip() for t in text.split(sep) if t.strip()]


def draw_caption_dropout(opts: CaptionOptions, epoch: int, rng: random.Random | None = None) -> bool:
    """Whether this fetch drops the whole caption (one draw only when a rate is set, as sd-scripts)."""
    r = rng if rng is not None else random
    drop = opts.caption_dropout_rate > 0 and r.random() < opts.caption_dropout_rate
    return drop or (
        opts.caption_dropout_every_n_epochs > 0 and epoch % opts.caption_dropout_every_n_epochs == 0
    )


def process_caption(
    caption: str, opts: CaptionOptions, epoch: int = 0, step: int = 0, rng: random.Random | None = None
) -> str:
    """One fetch of a caption. Draws from `rng` (default: the global `random`, like sd-scripts).

    Order: prefix/suffix -> dropout -> wildcard or first line -> shuffle/warmup/tag dropout with kept
    tokens -> secondary separator replaced by the separator.
    """
    r = rng if rng is not None else random
    caption = add_prefix_suffix(caption, opts)
    if draw_caption_dropout(opts, epoch, r):
        return ""
    if opts.enable_wildcard:
        if "\n" in caption:
            caption = r.choice(caption.split("\n"))
        caption = _WILDCARD.sub(lambda m: r.choice(m.group(1).split("|")), caption)
        caption = caption.replace("{{", "{").replace("}}", "}")
    else:
        caption = caption.split("\n")[0]

    sep = opts.caption_separator
    if opts.shuffle_caption or opts.token_warmup_step > 0 or opts.caption_tag_dropout_rate > 0:
        head: list[str] = []
        tail: list[str] = []
        kts = opts.keep_tokens_separator
        if kts and kts in caption:
            # "fixed ||| shuffled ||| fixed suffix"
            fixed_part, flex_part = caption.split(kts, 1)
            if kts in flex_part:
                flex_part, suffix_part = flex_part.split(kts, 1)
                tail = _split_tags(suffix_part, sep)
            head = _split_tags(fixed_part, sep)
            flex = _split_tags(flex_part, sep)
        else:
            tokens = [t.strip() for t in caption.strip().split(sep)]
            flex = tokens[:]
            if opts.keep_tokens > 0:
                head = tokens[: opts.keep_tokens]
                flex = tokens[opts.keep_tokens :]

        # a warmup step < 1 is a fraction of max_train_steps; the dataset resolves it before calling
        warm_steps = opts.token_warmup_step
        if warm_steps >= 1 and step < warm_steps:
            n = math.floor(step * ((len(flex) - opts.token_warmup_min) / warm_steps)) + opts.token_warmup_min
            flex = flex[:n]

        if opts.shuffle_caption:
            r.shuffle(flex)
        if opts.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if r.random() >= opts.caption_tag_dropout_rate]
        caption = ", ".join(head + flex + tail)

    if opts.secondary_separator:
        caption = caption.replace(opts.secondary_separator, sep)
    return caption


def deterministic_caption(caption: str, opts: CaptionOptions) -> str:
    """The caption a text-encoder cache stores: prefix/suffix, first line, secondary separator.

    sd-scripts caches the raw caption, so prefix/suffix silently vanish from cached outputs; we keep them,
    since they are deterministic and the user asked for them. Random parts (dropout, shuffle, wildcards)
    are refused or resolved to line one.
    """
    caption = add_prefix_suffix(caption, opts).split("\n")[0]
    if opts.secondary_separator:
        caption = caption.replace(opts.secondary_separator, opts.caption_separator)
    return caption


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """Lower-cased comma-separated tag counts, as written to ss_tag_frequency."""
    counts: Counter[str] = Counter()
    for cap in captions:
        for tag in cap.split(","):
            tag = tag.strip()
            if tag:
                counts[tag.lower()] += 1
    return dict(counts)


def caption_options(s: SubsetParams) -> CaptionOptions:
    return CaptionOptions(
        caption_prefix=s.caption_prefix,
        caption_suffix=s.caption_suffix,
        caption_separator=s.caption_separator,
        shuffle_caption=s.shuffle_caption,
        keep_tokens=s.keep_tokens,
        keep_tokens_separator=s.keep_tokens_separator,
        secondary_separator=s.secondary_separator,
        enable_wildcard=s.enable_wildcard,
        caption_dropout_rate=s.caption_dropout_rate,
        caption_dropout_every_n_epochs=s.caption_dropout_every_n_epochs,
        caption_tag_dropout_rate=s.caption_tag_dropout_rate,
        token_warmup_min=s.token_warmup_min,
        token_warmup_step=s.token_warmup_step,
    )
