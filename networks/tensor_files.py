"""The one reader of user-given tensor files (networks, checkpoints, state folders).

It looks at the bytes before trusting a reader: a safetensors file (header checked against the file
size, so a cut file is named as truncated), a PyTorch archive (read with ``weights_only`` only after
its pickle is scanned without running it; anything besides tensors is refused), a bare pickle
(refused, never unpickled), an empty file, a folder, or something else. Each failure is one
:class:`InputError` line naming the input and what was expected.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch

from networks.errors import InputError

SAFETENSORS = "safetensors"
TORCH_ARCHIVE = "torch"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header

_SIGNATURES = (
    (b"GGUF", "a GGUF file"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"RIFF", "a RIFF (e.g. WebP) file"),
    (b"\x93NUMPY", "a NumPy .npy file"),
    (b"\x89HDF", "an HDF5 (.h5) file"),
    (b"version https://git-lfs", "a Git LFS pointer (the real file was never downloaded)"),
)


def _label(path: Path, what: str | None) -> str:
    return f"{what} {path}" if what else str(path)


def _safetensors_problem(path: Path, size: int) -> str | None:
    """Why ``path`` (which starts like a safetensors file) cannot be read, or None when it can."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if 8 + n > size:
            return f"truncated: {size} bytes, but its header alone needs {8 + n}"
        raw = f.read(n)
    try:
        header = json.loads(raw)
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError):
        return "a damaged safetensors file (its header is not valid)"
    need = 8 + n + max(ends, default=0)
    if need > size:
        return f"truncated: {size} bytes, but its header promises {need}"
    if need < size:
        return f"a damaged safetensors file ({size - need} stray bytes after the tensor data)"
    return None


def _kind(path: Path) -> tuple[str, str | None]:
    """(kind, problem): kind is SAFETENSORS or TORCH_ARCHIVE when readable, else problem says why not."""
    if not path.exists():
        return "", "does not exist"
    if path.is_dir():
        return "", "is a folder, not a file"
    size = path.stat().st_size
    if size == 0:
        return "", "is empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < _MAX_HEADER:
        problem = _safetensors_problem(path, size)
        return (SAFETENSORS, None) if problem is None else ("", problem)
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            return "", "a truncated or damaged PyTorch/zip archive"
        with zipfile.ZipFile(path) as z:
            if not any(name.endswith("data.pkl") for name in z.namelist()):
                return "", "a zip archive that is not a PyTorch file"
        return TORCH_ARCHIVE, None
    if head[:1] == b"\x80" and 1 < head[1] < 6:
        return "", "a bare Python pickle; refused without loading it (unpickling can run code)"
    for sig, name in _SIGNATURES:
        if head.startswith(sig):
            return "", f"{name}, not a tensor file"
    if path.suffix.lower() in (".safetensors", ".sft") and size < 9:
        return "", f"truncated: only {size} bytes"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "", "a text file, not a tensor file"
    return "", "not a safetensors or PyTorch file (unrecognised content)"


def _unsafe_globals(path: Path) -> list[str]:
    """Python objects other than tensors named in a PyTorch archive's pickle (read as data, not run)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception as e:  # a damaged archive: torch raises RuntimeError from its zip reader
        raise ValueError(f"a damaged PyTorch archive ({_first_line(e)})") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_tensor_file(
    path: str | os.PathLike[str], what: str | None = None, *, allow_torch: bool = True,
    expected: str = "a .safetensors file",
) -> str:  # fmt: skip
    """Check ``path`` without loading its tensors; returns SAFETENSORS or TORCH_ARCHIVE.

    ``allow_torch`` accepts a ``torch.save`` archive that holds only tensors (read with weights_only).
    """
    p = Path(path)
    kind, problem = _kind(p)
    if kind == TORCH_ARCHIVE:
        if not allow_torch:
            problem = "a PyTorch pickle archive (.pt/.ckpt); not loaded"
        else:
            try:
                unsafe = _unsafe_globals(p)
            except ValueError as e:
                raise InputError(f"{_label(p, what)}: {e}; expected {expected}") from None
            if unsafe:
                shown = ", ".join(unsafe[:3]) + (" ..." if len(unsafe) > 3 else "")
                problem = f"holds Python objects besides tensors ({shown}); refused without loading it"
    if problem:
        raise InputError(f"{_label(p, what)}: {problem}; expected {expected}")
    return kind


def checked_header(f: BinaryIO) -> tuple[int, dict[str, Any]]:
    """(length, parsed JSON) of the header of a safetensors file open at offset 0 that `check_tensor_file`
    has passed (so the length fits the file and the JSON is valid)."""
    n = int.from_bytes(f.read(8), "little")
    return n, json.loads(f.read(n))


def safetensors_header(
    path: str | os.PathLike[str], what: str | None = None
) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """({name: (dtype, shape)}, metadata) from a safetensors header, after the checks above."""
    p = Path(path)
    check_tensor_file(p, what, allow_torch=False)
    with open(p, "rb") as f:
        _, header = checked_header(f)
    meta = header.pop("__metadata__", None) or {}
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()}, dict(meta)


@contextmanager
def _read_errors(p: Path, what: str | None, expected: str) -> Iterator[None]:
    try:
        yield
    except (MemoryError, InputError):
        raise
    except Exception as e:  # SafetensorError has no common base; torch raises RuntimeError/UnpicklingError
        raise InputError(f"{_label(p, what)}: cannot be read ({_first_line(e)}); expected {expected}") from e


def read_tensors(
    path: str | os.PathLike[str], what: str | None = None, *, allow_torch: bool = True,
    expected: str = "a .safetensors file",
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:  # fmt: skip
    """(tensors, metadata) of a checked file, all read at once; a PyTorch archive (see
    :func:`check_tensor_file`) is loaded by ``torch.load(weights_only=True)``, its ``state_dict`` entry
    unwrapped. A safetensors file is read with ``pread`` rather than mapped, so the tensors own their
    memory and nothing of the file stays resident after them (`networks.tensor_stream` reads a large
    model one tensor at a time)."""
    p = Path(path)
    kind = check_tensor_file(p, what, allow_torch=allow_torch, expected=expected)
    if kind == SAFETENSORS:
        from safetensors import safe_open

        with _read_errors(p, what, expected):
            with safe_open(str(p), framework="pt", backend="pread") as f:
                return {k: f.get_tensor(k) for k in f.offset_keys()}, dict(f.metadata() or {})
    with _read_errors(p, what, expected):
        data: Any = torch.load(str(p), map_location="cpu", weights_only=True)
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not any(isinstance(v, torch.Tensor) for v in data.values()):
        raise InputError(f"{_label(p, what)}: holds no tensors; expected {expected}")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}, {}


def check_archive(path: str | os.PathLike[str], what: str | None = None, expected: str = "") -> None:
    """A ``torch.save`` archive written by this program (e.g. a state folder's optimizer.bin): whole and
    unbroken (every entry's checksum); its content is left to the weights_only load."""
    p = Path(path)
    kind, problem = _kind(p)
    if not problem and kind != TORCH_ARCHIVE:
        problem = "not a PyTorch archive"
    if not problem:
        with zipfile.ZipFile(p) as z:
            try:
                bad = z.testzip()
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                bad = str(e)
        if bad:
            problem = f"damaged (entry {bad} fails its checksum)"
    if problem:
        tail = f"; expected {expected}" if expected else ""
        raise InputError(f"{_label(p, what)}: {problem}{tail}")


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt")


def check_weight_folder(folder: str | os.PathLike[str], what: str | None = None) -> None:
    """Every weight file directly in ``folder`` (e.g. a diffusers ``unet/``) is whole and tensors-only."""
    d = Path(folder)
    for pattern in WEIGHT_PATTERNS:
        for f in sorted(d.glob(pattern)):
            if f.is_file() and not f.name.endswith(".index.json"):
                check_tensor_file(f, what, expected="a complete weights file (re-download or re-save it)")
