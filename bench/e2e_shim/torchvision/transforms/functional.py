"""resize (tensor, nearest) and pil_to_tensor: the functional calls on sd-scripts' training path."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def pil_to_tensor(pic) -> torch.Tensor:
    arr = np.asarray(pic)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)


def resize(t: torch.Tensor, size, interpolation=None, antialias=None) -> torch.Tensor:
    mode = getattr(interpolation, "value", "nearest") or "nearest"
    lead = t.shape[:-2]
    x = t.reshape(-1, 1, *t.shape[-2:])
    y = F.interpolate(x.float(), size=list(size), mode=mode).to(t.dtype)
    return y.reshape(*lead, *y.shape[-2:])
