"""Planning of gen_img.py's images: prompt lines -> per-image jobs (seeds, sizes, multipliers) -> batches.

Pure bookkeeping, no models: sd-scripts' precedence (prompt option over command-line flag over default),
its seed rules and its batch splitting (consecutive images with equal settings share a batch).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
from dataclasses import dataclass

from library.inference.prompt_options import (
    PromptOptionError,
    PromptOptions,
    expand_dynamic_prompt,
    expand_multipliers,
    has_dynamic_groups,
    parse_prompt_line,
    read_prompt_file,
)
from library.io.png_metadata import SdxlSizeConditioning

logger = logging.getLogger("gen_img")

SDXL_DEFAULT_SIZE = 1024
MAX_SEED = 2**32 - 1


def verify_sampler(name: str, what: str) -> None:
    from library.inference.samplers import sampler_names

    names = sampler_names()
    if name.lower() not in names:
        raise ValueError(f"{what} {name!r} is not a known sampler; choose one of: {', '.join(names)}")


@dataclass(frozen=True)
class BatchKey(SdxlSizeConditioning):
    """Everything that must be equal for images to share one denoising batch: the SDXL size
    conditioning (also written to the PNG) and the fields below."""

    width: int
    height: int
    steps: int
    scale: float
    sampler: str
    network_muls: tuple[float, ...] | None


@dataclass
class ImageJob:
    key: BatchKey
    prompt: str
    negative_prompt: str
    raw_prompt: str
    seed: int
    filename: str | None


_WARNED_SIZES: set[tuple[str, int]] = set()


def _floor(v: int, step: int, what: str) -> int:
    out = v - v % step
    if out != v and (what, v) not in _WARNED_SIZES:  # warn once per value, not per image
        _WARNED_SIZES.add((what, v))
        logger.warning("%s %d is not a multiple of %d (this model's size step): using %d", what, v, step, out)
    return out


def job_key(args: argparse.Namespace, o: PromptOptions, n_live: int, size_step: int = 8) -> BatchKey:
    """Prompt options over command-line defaults (sd-scripts precedence); sizes floored to `size_step`."""
    width = _floor(o.width if o.width is not None else (args.W or SDXL_DEFAULT_SIZE), size_step, "width")
    height = _floor(o.height if o.height is not None else (args.H or SDXL_DEFAULT_SIZE), size_step, "height")
    if width < size_step or height < size_step:
        raise PromptOptionError(
            f"image size {width}x{height} is smaller than {size_step} pixels (in line {o.raw!r})"
        )
    ow = o.original_width if o.original_width is not None else (args.original_width or width)
    oh = o.original_height if o.original_height is not None else (args.original_height or height)
    nw = (
        o.original_width_negative
        if o.original_width_negative is not None
        else (args.original_width_negative or ow)
    )
    nh = (
        o.original_height_negative
        if o.original_height_negative is not None
        else (args.original_height_negative or oh)
    )
    if o.network_muls is not None and n_live == 0:
        raise PromptOptionError(
            f"--am {o.network_muls} needs a network applied as modules; there is no live network "
            f"(merged networks keep their --network_mul) (in line {o.raw!r})"
        )
    muls = expand_multipliers(o.network_muls, n_live, "--am")
    return BatchKey(
        width=width,
        height=height,
        steps=o.steps if o.steps is not None else args.steps,
        scale=o.scale if o.scale is not None else args.scale,
        sampler=(o.sampler or args.sampler).lower(),
        original_width=ow,
        original_height=oh,
        original_width_negative=nw,
        original_height_negative=nh,
        crop_top=o.crop_top if o.crop_top is not None else (args.crop_top or 0),
        crop_left=o.crop_left if o.crop_left is not None else (args.crop_left or 0),
        network_muls=tuple(muls) if muls is not None else None,
    )


def _parse_line(line: str) -> PromptOptions:
    """A line's options; a dynamic line is checked through each variant of a sample expansion, and
    its base options come from the first variants (the real picks are drawn per image later)."""
    if not has_dynamic_groups(line):
        return parse_prompt_line(line)
    for variant in expand_dynamic_prompt(line, 1, random.Random(0), all_variants=True):
        parse_prompt_line(variant)
    o = parse_prompt_line(expand_dynamic_prompt(line, 1, random.Random(0), all_variants=True)[0])
    o.raw = line.strip()
    return o


def parse_prompt_lines(args: argparse.Namespace) -> list[PromptOptions]:
    lines = read_prompt_file(args.from_file) if args.from_file is not None else [args.prompt]
    if not lines or not lines[0].strip():
        raise ValueError(f"no prompt found in {args.from_file or '--prompt'}")
    parsed = [_parse_line(line) for line in lines]
    for o in parsed:
        if o.unsupported:
            logger.warning(
                "prompt options not implemented, ignored: %s (in %r)", sorted(o.unsupported), o.raw
            )
        for name in ("strength", "clip_prompt"):
            if getattr(o, name) is not None:
                logger.warning("prompt option for img2img/CLIP guidance ignored: %s (in %r)", name, o.raw)
        if "nl" in o.given and o.negative_scale is not None:
            raise PromptOptionError(f"--nl (negative scale) is not implemented (in line {o.raw!r})")
        if o.sampler is not None:
            verify_sampler(o.sampler, f"prompt option --ss in line {o.raw!r}:")
    return parsed


def seed_source(args: argparse.Namespace, n_lines: int) -> random.Random | None:
    """sd-scripts: `--seed` seeds a generator that draws every image's seed, except for a single image
    from a one-line prompt file, where the seed is meant to be used as is (sd-scripts crashes there
    on a shadowed name; we do what it intends). Returns None for the "as is" case."""
    if args.seed is not None:
        if args.from_file is not None and n_lines == 1 and args.images_per_prompt == 1:
            return None
        return random.Random(args.seed)
    return random.Random()


def plan_iteration(
    args: argparse.Namespace,
    parsed: list[PromptOptions],
    rng: random.Random | None,
    n_live: int,
    size_step: int = 8,
    variant_rng: random.Random | None = None,
) -> list[ImageJob]:
    """The images of one `--n_iter` round, in generation order.

    A dynamic line gives one image per variant (`images_per_prompt` random variants, or every
    enumerated one); its `--d` seeds are taken from the line as a whole."""
    iter_seed = rng.randint(0, MAX_SEED) if (args.iter_same_seed and rng is not None) else None
    variant_rng = variant_rng or random.Random(args.seed)
    order = list(parsed)
    if args.shuffle_prompts:
        (rng or random.Random(args.seed)).shuffle(order)
    jobs: list[ImageJob] = []
    for o in order:
        if has_dynamic_groups(o.raw):
            images = [
                parse_prompt_line(v)
                for v in expand_dynamic_prompt(o.raw, args.images_per_prompt, variant_rng)
            ]
        else:
            images = [o] * args.images_per_prompt
        given = list(o.seeds) if o.seeds is not None else None
        randomize = False
        seed = None
        for pi, opts in enumerate(images):
            key = job_key(args, opts, n_live, size_step)
            if given is not None and not randomize:
                # --d a,b,c: one seed per image; missing ones repeat the last; -1 = random from here on
                value = given[pi] if pi < len(given) else given[-1]
                if value == -1:
                    randomize = True
                else:
                    seed = value
            if given is None or randomize:
                if rng is None:
                    seed = args.seed
                elif iter_seed is not None and not randomize:
                    seed = iter_seed
                else:
                    seed = rng.randint(0, MAX_SEED)
            assert seed is not None
            filename = opts.filename
            if filename is not None:
                if len(images) > 1:
                    stem, ext = os.path.splitext(filename)
                    filename = f"{stem}_{pi}{ext}"
                if not filename.lower().endswith(".png"):
                    filename += ".png"
            jobs.append(ImageJob(key, opts.prompt, opts.negative_prompt or "", opts.raw, int(seed), filename))
    return jobs


def split_batches(jobs: list[ImageJob], batch_size: int) -> list[list[ImageJob]]:
    """Consecutive jobs with equal settings share a batch of at most `batch_size` images."""
    batches: list[list[ImageJob]] = []
    for job in jobs:
        if batches and batches[-1][0].key == job.key and len(batches[-1]) < batch_size:
            batches[-1].append(job)
        else:
            batches.append([job])
    return batches
