"""Atomic file writes: a temp file beside the target, then one rename, so a crash never leaves half a file.

Every writer of user-visible files (networks, checkpoints, caches, PNGs, states) goes through here. It lives
in `networks/` because both the network package and `library/` write files, and `networks/` imports nothing
from `library/`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file


def _default_file_mode() -> int:
    # mkstemp creates 0600 files; give the result the permissions a plain open() would (0666 & ~umask)
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _default_file_mode()


def atomic_write(
    path: str | os.PathLike[str], writer: Callable[[str], None], suffix: str | None = None
) -> Path:
    """Call ``writer(tmp_path)`` on a temp file in the target folder, then rename it over ``path``.

    The temp name keeps the final extension (or ``suffix``) because some writers pick the format from it.
    On any error the temp file is removed and the previous ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> Path:
    """safetensors ``save_file`` of CPU-contiguous copies, written atomically."""
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=metadata))
