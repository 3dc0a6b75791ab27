"""Image listing, probing, loading, resizing and cropping (PIL based)."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .buckets import Size
from .config import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)

_RESAMPLE = {
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "cubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,  # PIL's box filter is the area average (cv2 INTER_AREA)
    "box": Image.Resampling.BOX,
}


def list_images(image_dir: Path) -> list[Path]:
    """Images directly inside `image_dir` (not recursive), sorted by name."""
    return sorted(p for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def probe_image(path: Path) -> Size | None:
    """(width, height) of a readable image; None (with a warning naming the file) when it is not."""
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()  # checks structure/CRCs without a full decode
        return (int(size[0]), int(size[1]))
    except Exception as e:  # PIL raises many types for broken files
        logger.warning("skipping unreadable image %s: %s", path, e)
        return None


def load_rgb(path: Path) -> Image.Image:
    return load_image(path, alpha=False)[0]


def load_image(path: Path, alpha: bool) -> tuple[Image.Image, Image.Image | None]:
    """RGB image and, when `alpha`, its alpha channel as an 'L' image (fully opaque if it has none)."""
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
            if not alpha:
                return rgb, None
            has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
            mask = im.convert("RGBA").getchannel("A") if has_alpha else Image.new("L", im.size, 255)
            return rgb, mask
    except Exception as e:
        raise OSError(f"cannot read image {path}: {e}") from e


def resize_image(img: Image.Image, size: Size, interpolation: str | None) -> Image.Image:
    """Resize to (w, h); default filter is area when shrinking and Lanczos when enlarging (sd-scripts)."""
    if img.size == tuple(size):
        return img
    if interpolation is None:
        shrinking = size[0] * size[1] < img.size[0] * img.size[1]
        interpolation = "area" if shrinking else "lanczos"
    return img.resize(size, resample=_RESAMPLE[interpolation])


def crop_offsets(resized: Size, bucket: Size, random_crop: bool, rng: random.Random | None = None) -> Size:
    """(left, top) of the bucket-sized window: centred, or random with random_crop."""
    r = rng if rng is not None else random
    left = top = 0
    if resized[0] > bucket[0]:
        trim = resized[0] - bucket[0]
        left = r.randint(0, trim) if random_crop else trim // 2
    if resized[1] > bucket[1]:
        trim = resized[1] - bucket[1]
        top = r.randint(0, trim) if random_crop else trim // 2
    return left, top


def resize_and_crop(
    img: Image.Image,
    bucket: Size,
    resized: Size,
    random_crop: bool,
    interpolation: str | None,
    mask: Image.Image | None = None,
) -> Image.Image | tuple[Image.Image, Image.Image]:
    """Cover-resize and crop to the bucket; a mask (alpha) gets the same resize and the same window."""
    img = resize_image(img, resized, interpolation)
    left, top = crop_offsets(img.size, bucket, random_crop)
    box = (left, top, left + bucket[0], top + bucket[1])
    out = img.crop(box)
    if out.size != tuple(bucket) or min(img.size[0] - bucket[0], img.size[1] - bucket[1]) < 0:
        raise ValueError(f"image resized to {img.size} cannot be cropped to bucket {bucket}")
    if mask is None:
        return out
    return out, resize_image(mask, resized, interpolation).crop(box)


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """'L' image -> (H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)


def color_aug(img: Image.Image) -> Image.Image:
    """Light colour jitter like sd-scripts: 1/3 of the time a hue shift (+-8/180) or a gamma in [0.95, 1.05]."""
    if random.random() > 0.33:
        return img
    if random.random() > 0.5:
        shift = random.uniform(-8, 8) / 180.0
        hsv = np.asarray(img.convert("HSV")).copy()
        hsv[..., 0] = ((hsv[..., 0].astype(np.float32) / 255.0 + shift) % 1.0 * 255.0).astype(np.uint8)
        return Image.fromarray(hsv, "HSV").convert("RGB")
    gamma = random.uniform(0.95, 1.05)
    arr = np.asarray(img).astype(np.float32) / 255.0
    return Image.fromarray(np.clip(arr**gamma * 255.0 + 0.5, 0, 255).astype(np.uint8))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """HWC uint8 -> CHW float32 in [-1, 1]."""
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())
