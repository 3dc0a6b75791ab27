"""Aspect-ratio buckets with the same numbers as sd-scripts.

A bucket is a (width, height) pair. Every image is assigned to one bucket, cover-resized so that the
bucket fits inside it (sides rounded half-up) and cropped to the bucket (docs/dataset_config.md,
"Buckets"). The numbers must equal sd-scripts' since the bucket decides the crop conditioning the model
sees; the functions here are pure so that tests can pin golden numbers.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

Size = tuple[int, int]  # (width, height)


def round_half_up(x: float) -> int:
    """sd-scripts rounds resized sides with int(x + 0.5) (not banker's rounding)."""
    return int(x + 0.5)


def make_bucket_resolutions(max_reso: Size, min_size: int, max_size: int, divisible: int) -> list[Size]:
    """All buckets whose area does not exceed max_reso's area, sorted by (width, height)."""
    max_w, max_h = max_reso
    max_area = max_w * max_h
    resos: set[Size] = set()
    side = int(math.sqrt(max_area) // divisible) * divisible
    resos.add((side, side))
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


def adjust_min_max_bucket_reso(
    resolution: Size, min_reso: int, max_reso: int, steps: int, where: str = "dataset"
) -> tuple[int, int]:
    """Round min down and max up to `steps`; both must bracket the training resolution."""
    if steps <= 0:
        raise ValueError(f"{where}: bucket_reso_steps must be a positive integer, got {steps}")
    if min_reso < steps:  # rounding down would give a 0-pixel bucket side (sd-scripts divides by zero)
        raise ValueError(
            f"{where}: min_bucket_reso ({min_reso}) is smaller than bucket_reso_steps ({steps}); "
            f"use min_bucket_reso >= {steps} or a smaller bucket_reso_steps"
        )
    if min_reso % steps != 0:
        min_reso -= min_reso % steps
    if max_reso % steps != 0:
        max_reso += steps - max_reso % steps
    if min_reso > min(resolution):
        raise ValueError(
            f"{where}: min_bucket_reso ({min_reso}) must be <= the smaller side of resolution {resolution}"
        )
    if max_reso < max(resolution):
        raise ValueError(
            f"{where}: max_bucket_reso ({max_reso}) must be >= the larger side of resolution {resolution}"
        )
    return min_reso, max_reso


def get_crop_ltrb(bucket_reso: Size, image_size: Size) -> tuple[float, float, float, float]:
    """Letterbox box of the whole image inside the bucket (sd-scripts' SDXL crop conditioning).

    This is deliberately sd-scripts' formula, odd as it is: it describes where the image would sit if it
    were fitted *inside* the bucket, not the real cover-crop offsets. Models trained with sd-scripts saw
    these values as crop conditioning, so we feed the same. Values stay floats as there.
    """
    bucket_ar = bucket_reso[0] / bucket_reso[1]
    image_ar = image_size[0] / image_size[1]
    if bucket_ar > image_ar:
        fit_w, fit_h = bucket_reso[1] * image_ar, float(bucket_reso[1])
    else:
        fit_w, fit_h = float(bucket_reso[0]), bucket_reso[0] / image_ar
    left = (bucket_reso[0] - fit_w) // 2
    top = (bucket_reso[1] - fit_h) // 2
    return left, top, left + fit_w, top + fit_h


def crop_top_left_for(crop_ltrb: tuple[float, ...], target_size: Size, flipped: bool) -> tuple[int, int]:
    """(top, left) conditioning; a flipped sample mirrors the letterbox horizontally."""
    left = target_size[0] - crop_ltrb[2] if flipped else crop_ltrb[0]
    return int(crop_ltrb[1]), int(left)


@dataclass
class BucketManager:
    """Holds the bucket list and the image keys per bucket.

    no_upscale=False: a fixed list from make_bucket_resolutions. no_upscale=True: buckets are created
    from the (possibly shrunk) image sizes floored to `steps`.
    """

    no_upscale: bool
    max_reso: Size
    min_size: int | None
    max_size: int | None
    steps: int | None
    resos: list[Size] = field(default_factory=list)
    buckets: list[list[str]] = field(default_factory=list)
    _index: dict[Size, int] = field(default_factory=dict)

    def make_buckets(self) -> None:
        assert self.min_size is not None and self.max_size is not None and self.steps is not None
        self.set_predefined_resos(
            make_bucket_resolutions(self.max_reso, self.min_size, self.max_size, self.steps)
        )

    def set_predefined_resos(self, resos: list[Size]) -> None:
        self.predefined = list(resos)
        self.predefined_set = set(resos)
        self.predefined_ars = [w / h for w, h in resos]
        self.resos = []
        self.buckets = []
        self._index = {}

    def _add_reso(self, reso: Size) -> None:
        if reso not in self._index:
            self._index[reso] = len(self.resos)
            self.resos.append(reso)
            self.buckets.append([])

    def _round_to_steps(self, x: float) -> int:
        assert self.steps is not None
        v = int(x + 0.5)
        return v - v % self.steps

    def select_bucket(self, image_width: int, image_height: int) -> tuple[Size, Size, float]:
        """Return (bucket_reso, resized_size, ar_error) for an image of the given size."""
        ar = image_width / image_height
        if not self.no_upscale:
            reso: Size = (image_width, image_height)
            if reso not in self.predefined_set:
                errors = [abs(a - ar) for a in self.predefined_ars]
                reso = self.predefined[errors.index(min(errors))]  # first on ties, as numpy argmin
            bucket_ar = reso[0] / reso[1]
            scale = reso[1] / image_height if ar > bucket_ar else reso[0] / image_width
            resized = (round_half_up(image_width * scale), round_half_up(image_height * scale))
        else:
            assert self.steps is not None
            max_area = self.max_reso[0] * self.max_reso[1]
            if image_width * image_height > max_area:
                # shrink to max area keeping AR; try width-led and height-led rounding, keep the better AR
                rw = math.sqrt(max_area * ar)
                rh = max_area / rw
                bw = self._round_to_steps(rw)
                bh_w = self._round_to_steps(bw / ar)
                ar_w = bw / bh_w
                bh = self._round_to_steps(rh)
                bw_h = self._round_to_steps(bh * ar)
                ar_h = bw_h / bh
                if abs(ar_w - ar) < abs(ar_h - ar):
                    resized = (bw, round_half_up(bw / ar))
                else:
                    resized = (round_half_up(bh * ar), bh)
            else:
                resized = (image_width, image_height)
            reso = (resized[0] - resized[0] % self.steps, resized[1] - resized[1] % self.steps)
            if min(reso) <= 0:
                raise ValueError(
                    f"an image of {image_width}x{image_height} is smaller than bucket_reso_steps ({self.steps}) "
                    "with bucket_no_upscale"
                )
        self._add_reso(reso)
        return reso, resized, reso[0] / reso[1] - ar

    def add_image(self, reso: Size, key: str) -> None:
        self._add_reso(reso)
        self.buckets[self._index[reso]].append(key)

    def sort(self) -> None:
        """Order buckets by resolution (bucket_info indices follow this order)."""
        order = sorted(range(len(self.resos)), key=lambda i: self.resos[i])
        self.resos = [self.resos[i] for i in order]
        self.buckets = [self.buckets[i] for i in order]
        self._index = {r: i for i, r in enumerate(self.resos)}

    def shuffle(self) -> None:
        for bucket in self.buckets:
            random.shuffle(bucket)
