"""Atomic file writes (see networks.atomic_io, where the shared writer lives) and the `.npz` cache writer."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from networks.atomic_io import _FILE_MODE, atomic_write, save_safetensors_atomic  # noqa: F401  (re-exported)


def save_npz_atomic(path: str | os.PathLike[str], arrays: dict[str, np.ndarray]) -> Path:
    """Uncompressed ``.npz`` (the layout sd-scripts' caches use), written atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object keeps numpy from appending another ".npz"
            np.savez(f, **arrays)

    return atomic_write(path, write)
