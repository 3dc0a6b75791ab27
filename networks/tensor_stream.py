"""Tensor files read one tensor at a time, for loading large models without a second copy on the host.

`safetensors.torch.load_file` (and `safe_open(...).get_tensor`) return tensors backed by a memory map of
the whole file: every page read stays resident in the process until the file is closed, so loading a
model and casting or moving it holds the file's bytes and the converted copy at once. Here each tensor is
read with plain file reads into memory of its own: the caller converts it, places it (CPU or device) and
drops the buffer, so the host holds at most one tensor in flight beyond what it keeps.

Files go through `networks.tensor_files.check_tensor_file` first (same messages for truncated, pickled or
foreign files). A tensors-only `torch.save` archive cannot be read piecewise; it is read whole through
`read_tensors` and handed out one tensor at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from networks.errors import InputError
from networks.tensor_files import SAFETENSORS, check_tensor_file, checked_header, read_tensors

# safetensors dtype names -> torch dtypes
DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


@dataclass(frozen=True)
class _Entry:
    file: int  # index into TensorStream's files
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file (safetensors) or -1 (archive)
    nbytes: int


class TensorStream:
    """The tensors of one or more checked files (e.g. a model's shards), read on demand.

    `keys()` lists them in file order, `meta(key)` is a meta-device tensor with the stored dtype and shape
    (for shape-only work such as inferring a config), `read(key)` a CPU tensor with memory of its own (or,
    `staged`, in a reused buffer).
    A key present in several files is read from the last one. Use as a context manager (closes the files).
    """

    def __init__(
        self, paths: Iterable[str | os.PathLike[str]], what: str | None = None, *, allow_torch: bool = True,
        expected: str = "a .safetensors file",
    ) -> None:  # fmt: skip
        self.paths = [Path(p) for p in paths]
        self.what, self.expected = what, expected
        self.metadata: dict[str, str] = {}
        self._entries: dict[str, _Entry] = {}
        self._handles: list[BinaryIO | None] = []
        self._archives: dict[str, torch.Tensor] = {}  # tensors of torch.save archives, handed out once
        self._staging: torch.Tensor | None = None
        try:
            for i, p in enumerate(self.paths):
                self._add(i, p, allow_torch)
        except BaseException:
            self.close()
            raise

    def _label(self, i: int) -> str:
        return f"{self.what} {self.paths[i]}" if self.what else str(self.paths[i])

    def _add(self, i: int, p: Path, allow_torch: bool) -> None:
        if check_tensor_file(p, self.what, allow_torch=allow_torch, expected=self.expected) != SAFETENSORS:
            sd, _ = read_tensors(p, self.what, allow_torch=allow_torch, expected=self.expected)
            self._handles.append(None)
            for k, t in sd.items():
                self._archives[k] = t
                self._entries[k] = _Entry(i, t.dtype, tuple(t.shape), -1, t.nbytes)
            return
        f = open(p, "rb")  # noqa: SIM115  (kept open for the reads; closed by close())
        self._handles.append(f)
        n, header = checked_header(f)
        self.metadata.update(header.pop("__metadata__", None) or {})
        entries = []
        for k, v in header.items():
            dtype = DTYPES.get(v.get("dtype"))
            if dtype is None:
                raise InputError(
                    f"{self._label(i)}: tensor {k} has dtype {v.get('dtype')}, which cannot be loaded here; "
                    f"expected {self.expected}"
                )
            shape, (lo, hi) = tuple(int(s) for s in v["shape"]), v["data_offsets"]
            numel = 1
            for s in shape:
                numel *= s
            if hi - lo != numel * dtype.itemsize or lo < 0:
                raise InputError(
                    f"{self._label(i)}: a damaged safetensors file (tensor {k}: {hi - lo} bytes for shape "
                    f"{list(shape)} {v['dtype']}); expected {self.expected}"
                )
            entries.append((lo, k, _Entry(i, dtype, shape, 8 + n + lo, hi - lo)))
        for _, k, e in sorted(entries, key=lambda x: x[0]):  # file order: the reads go front to back
            self._entries.pop(k, None)
            self._entries[k] = e

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def meta(self, key: str) -> torch.Tensor:
        e = self._entries[key]
        return torch.empty(e.shape, dtype=e.dtype, device="meta")

    def read(self, key: str, staged: bool = False) -> torch.Tensor:
        """The tensor `key` on the CPU. `staged`: in one buffer that every staged read reuses (valid until
        the next one; `is_staged` tells), for a tensor the caller converts or copies at once. Loading a
        model that way allocates only what it keeps: fresh read buffers freed after a cast would leave
        holes in the heap that the process keeps resident."""
        e = self._entries[key]
        if e.start < 0:
            return self._archives.pop(key)
        if staged:
            if self._staging is None:
                self._staging = torch.empty(max(x.nbytes for x in self._entries.values()), dtype=torch.uint8)
            buf = self._staging[: e.nbytes]
        else:
            buf = torch.empty(e.nbytes, dtype=torch.uint8)
        f = self._handles[e.file]
        assert f is not None
        f.seek(e.start)
        view, done = memoryview(buf.numpy()), 0
        while done < e.nbytes:  # one read may return less than asked (very large tensors)
            got = f.readinto(view[done:])
            if not got:
                raise InputError(
                    f"{self._label(e.file)}: truncated while reading tensor {key}; expected {self.expected}"
                )
            done += got
        return buf.view(e.dtype).reshape(e.shape)

    def is_staged(self, t: torch.Tensor) -> bool:
        """Whether `t` lives in the buffer that staged reads reuse (so it must be copied to be kept)."""
        s = self._staging
        return s is not None and t.device.type == "cpu" and t.untyped_storage().data_ptr() == s.data_ptr()

    def items(
        self, keys: Iterable[str] | None = None, staged: bool = False
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, tensor) for `keys` (default all) in file order, each read when its turn comes."""
        wanted = None if keys is None else set(keys)
        for k in self.keys():
            if wanted is None or k in wanted:
                yield k, self.read(k, staged)

    def close(self) -> None:
        for f in self._handles:
            if f is not None:
                f.close()
        self._handles = []
        self._archives = {}
        self._staging = None

    def __enter__(self) -> TensorStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
