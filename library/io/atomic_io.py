"""Atomic file writes (the shared writer lives in networks.atomic_io) and the `.npz` cache writer."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from networks.atomic_io import (  # noqa: F401  (re-exported for library/ callers)
    _FILE_MODE,
    NoSpaceError,
    atomic_dir,
    atomic_write,
    check_free_space,
    free_bytes,
    safetensors_size,
    save_safetensors_atomic,
)


def save_npz_atomic(path: str | os.PathLike[str], arrays: dict[str, np.ndarray]) -> Path:
    """Uncompressed ``.npz`` (the layout sd-scripts' caches use), written atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object keeps numpy from appending another ".npz"
            np.savez(f, **arrays)

    return atomic_write(path, write)
