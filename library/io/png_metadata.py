"""PNG text metadata and output file names of generated images (sd-scripts `gen_img.py` conventions).

Text chunks: `prompt`, `seed`, `sampler`, `steps`, `scale`, `negative-prompt`, `negative-scale`,
`clip-prompt`, `raw-prompt`, SDXL size conditioning (`original-height`, `original-width`,
`original-height-negative`, `original-width-negative`, `crop-top`, `crop-left`) and, added by this
project, `networks` (JSON list of the adapters that shaped the image).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from library.io.atomic_io import atomic_write


@dataclass(frozen=True)
class NetworkRecord:
    """What the PNG says about one adapter: module, weights file name, multiplier, merged or live."""

    module: str
    weights: str
    multiplier: float
    merged: bool


@dataclass(frozen=True)
class SdxlSizeConditioning:
    original_width: int
    original_height: int
    original_width_negative: int
    original_height_negative: int
    crop_top: int
    crop_left: int


def image_text_metadata(
    *,
    prompt: str,
    seed: int,
    sampler: str,
    steps: int,
    scale: float,
    negative_prompt: str | None = None,
    negative_scale: float | None = None,
    clip_prompt: str | None = None,
    raw_prompt: str | None = None,
    size_conditioning: SdxlSizeConditioning | None = None,
    networks: Sequence[NetworkRecord] = (),
) -> dict[str, str]:
    """The text chunks of one image, in sd-scripts' order, every value a string."""
    text: dict[str, str] = {
        "prompt": prompt,
        "seed": str(seed),
        "sampler": sampler,
        "steps": str(steps),
        "scale": str(scale),
    }
    if negative_prompt is not None:
        text["negative-prompt"] = negative_prompt
    if negative_scale is not None:
        text["negative-scale"] = str(negative_scale)
    if clip_prompt is not None:
        text["clip-prompt"] = clip_prompt
    if raw_prompt is not None:
        text["raw-prompt"] = raw_prompt
    if size_conditioning is not None:
        c = size_conditioning
        text["original-height"] = str(c.original_height)
        text["original-width"] = str(c.original_width)
        text["original-height-negative"] = str(c.original_height_negative)
        text["original-width-negative"] = str(c.original_width_negative)
        text["crop-top"] = str(c.crop_top)
        text["crop-left"] = str(c.crop_left)
    if networks:
        text["networks"] = json.dumps([asdict(n) for n in networks], ensure_ascii=False)
    return text


def save_png(image: Image.Image, path: str | Path, text: Mapping[str, str]) -> Path:
    """Write `image` as PNG with `text` chunks, atomically (temp file in the same folder + rename)."""
    path = Path(path)
    info = PngInfo()
    for key, value in text.items():
        # iTXt keeps non-Latin-1 prompts (Japanese, emoji) intact; tEXt would fail to encode them
        info.add_itxt(key, value)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def read_png_text(path: str | Path) -> dict[str, str]:
    """All text chunks of a PNG file."""
    with Image.open(path) as im:
        im.load()
        return dict(im.text)


def timestamped_name(timestamp: str, index: int, seed: int, highres_prefix: str = "") -> str:
    """`im_<YYYYmmddHHMMSS>_<hr><iii>_<seed>.png`; `index` is the image's position in its batch."""
    return f"im_{timestamp}_{highres_prefix}{index:03d}_{seed}.png"


def sequential_name(number: int, highres_prefix: str = "") -> str:
    """`im_<hr><NNNNNN>.png` for `--sequential_file_name` (number counts from 1)."""
    return f"im_{highres_prefix}{number:06d}.png"


def first_available_name(outdir: str | Path, filename: str) -> str:
    """`filename` if free in `outdir`, else `<stem>_<k><ext>` with the smallest free k >= 1."""
    outdir = Path(outdir)
    if not (outdir / filename).exists():
        return filename
    stem, ext = os.path.splitext(filename)
    k = 1
    while (outdir / f"{stem}_{k}{ext}").exists():
        k += 1
    return f"{stem}_{k}{ext}"
