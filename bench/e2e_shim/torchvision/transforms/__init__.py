"""Compose / ToTensor / Normalize as sd-scripts' image pipeline uses them (PIL or HWC uint8 in, CHW float out)."""

from __future__ import annotations

import enum

import numpy as np
import torch

from . import functional


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


class Compose:
    def __init__(self, steps):
        self.steps = list(steps)

    def __call__(self, x):
        for step in self.steps:
            x = step(x)
        return x


class ToTensor:
    def __call__(self, pic):
        arr = np.asarray(pic)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
        return t.float().div(255.0) if arr.dtype == np.uint8 else t.float()


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def __call__(self, t):
        shape = (-1, 1, 1)
        mean = torch.as_tensor(self.mean, dtype=t.dtype).view(shape)
        return (t - mean) / torch.as_tensor(self.std, dtype=t.dtype).view(shape)


__all__ = ["Compose", "InterpolationMode", "Normalize", "ToTensor", "functional"]
