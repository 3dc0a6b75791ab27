"""Atomic file writes: a temp file beside the target, then one rename, so a crash never leaves half a file.

Every writer of user-visible files (networks, checkpoints, caches, PNGs, states) goes through here; free
space is checked first where the size is known, and a full disk is reported naming the file and its size.
It lives in `networks/` because both the network package and `library/` write files, and `networks/`
imports nothing from `library/` (`library.io.atomic_io` re-exports it and adds the `.npz` writer).
"""

from __future__ import annotations

import errno
import os
import shutil
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
_SPACE_MARGIN = 1 << 20  # file-system blocks and metadata on top of the payload


class NoSpaceError(OSError):
    """A file or folder could not be written for lack of disk space (the message names it and the size)."""

    def __init__(self, path: Path, needed: int | None, free: int, written: int = 0) -> None:
        self.path, self.needed, self.written = path, needed, written
        if needed is not None:
            size = f"it needs about {_mb(needed)}"
        else:
            size = f"{_mb(written)} were written before the disk filled" if written else "size unknown"
        super().__init__(
            errno.ENOSPC,
            f"{path}: could not be written, no space left on device ({size}, {_mb(free)} free in "
            f"{path.parent}); the previous file, if any, is unchanged",
        )

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def free_bytes(folder: str | os.PathLike[str]) -> int:
    return shutil.disk_usage(folder).free


def check_free_space(path: str | os.PathLike[str], needed: int) -> None:
    """Refuse before writing when ``path``'s disk cannot hold ``needed`` bytes (plus a small margin)."""
    path = Path(path)
    free = free_bytes(path.parent)
    if free < needed + _SPACE_MARGIN:
        raise NoSpaceError(path, needed, free)


_TORCH_WRITE_FAILURES = ("write failed", "PytorchStreamWriter", "inline_container")


def _is_no_space(exc: BaseException, folder: Path, size: int | None) -> bool:
    """Called before the temp file is removed, so a full disk still shows as (almost) no free space."""
    if not isinstance(exc, Exception):
        return False
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    if "No space left on device" in text or "os error 28" in text:  # safetensors' own error type
        return True
    # torch's zip writer does not say why a write failed: judge by the space left
    if any(t in text for t in _TORCH_WRITE_FAILURES):
        return free_bytes(folder) < (size or 0) + _SPACE_MARGIN
    return False


def _size_of(path: str | os.PathLike[str]) -> int:
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size if p.exists() else 0


def atomic_write(
    path: str | os.PathLike[str], writer: Callable[[str], None], suffix: str | None = None,
    size: int | None = None,
) -> Path:  # fmt: skip
    """Call ``writer(tmp_path)`` on a temp file in the target folder, then rename it over ``path``.

    The temp name keeps the final extension (or ``suffix``) because some writers pick the format from it.
    With ``size`` (bytes) the free space is checked first. On any error the temp file is removed and the
    previous ``path`` is left untouched; a full disk becomes a :class:`NoSpaceError` naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if size is not None:
        check_free_space(path, size)
    suffix = path.suffix if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException as e:
        written, full = _size_of(tmp), _is_no_space(e, path.parent, size)
        if os.path.exists(tmp):
            os.unlink(tmp)
        if full:  # also when a nested writer named its own temp file: the user knows only ``path``
            needed = size if size is not None else getattr(e, "needed", None)
            raise NoSpaceError(path, needed, free_bytes(path.parent), written) from e
        raise
    return path


def _swap_in(tmp: Path, path: Path) -> None:
    """Rename the finished folder over ``path``; an older folder is moved aside first and restored on error."""
    old = path.parent / f".{path.name}.old"
    moved = path.exists()
    if moved:
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if moved:
            os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def atomic_dir(
    path: str | os.PathLike[str], writer: Callable[[Path], None], size: int | None = None,
    on_main: bool = True, barrier: Callable[[], None] | None = None,
) -> Path:  # fmt: skip
    """Fill a folder through ``writer(tmp_dir)``, then swap it in for ``path`` (a state folder is never
    left half-written). With several processes every one calls this with the same ``path``; only the
    main one (``on_main``) creates, renames and cleans up, and ``barrier`` keeps them in step.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.partial"  # one name for all processes
    wait = barrier or (lambda: None)
    if on_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        if size is not None:
            check_free_space(path, size)
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a run that was killed
        tmp.mkdir()
    wait()
    try:
        writer(tmp)
        wait()
        if on_main:
            _swap_in(tmp, path)
    except BaseException as e:
        if on_main:
            written, full = _size_of(tmp), _is_no_space(e, path.parent, size)
            shutil.rmtree(tmp, ignore_errors=True)
            if full:
                needed = size if size is not None else getattr(e, "needed", None)
                raise NoSpaceError(path, needed, free_bytes(path.parent), written) from e
        raise
    wait()
    return path


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> Path:
    """safetensors ``save_file`` of CPU-contiguous copies, written atomically."""
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    size = safetensors_size(cpu, metadata)
    return atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=metadata), size=size)


def safetensors_size(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """An upper estimate of a safetensors file's size: the tensor bytes plus a generous header."""
    header = sum(len(k) + 96 for k in tensors) + sum(len(k) + len(v) + 8 for k, v in (metadata or {}).items())
    return sum(v.numel() * v.element_size() for v in tensors.values()) + header + 8
