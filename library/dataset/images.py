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
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
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
    img: Image.Image, bucket: Size, resized: Size, random_crop: bool, interpolation: str | None
) -> Image.Image:
    img = resize_image(img, resized, interpolation)
    left, top = crop_offsets(img.size, bucket, random_crop)
    out = img.crop((left, top, left + bucket[0], top + bucket[1]))
    if out.size != tuple(bucket):
        raise ValueError(f"image resized to {img.size} cannot be cropped to bucket {bucket}")
    return out


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
