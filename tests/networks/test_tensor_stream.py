"""networks/tensor_stream.py: tensors read one by one with their exact stored bits, in file order, the
same checks and messages as the whole-file reader, and no memory map left resident (peak host memory of
reading a file and keeping every tensor is the file's size, not twice it; Linux /proc counters)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from networks.errors import InputError
from networks.tensor_stream import TensorStream

REPO = Path(__file__).resolve().parents[2]


def _all_dtypes() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64) * 100
    out = {
        str(d).split(".")[1]: x.to(d) for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16)
    }
    out |= {str(d).split(".")[1]: x.clamp(-400, 400).to(d) for d in (torch.float8_e4m3fn, torch.float8_e5m2)}
    out |= {str(d).split(".")[1]: x.to(torch.int64).to(d) for d in (torch.int64, torch.int32, torch.int16)}
    out |= {"int8": x.clamp(-100, 100).to(torch.int8), "uint8": x.abs().clamp(0, 255).to(torch.uint8)}
    out |= {
        "bool": x > 0,
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "big": torch.randn(300, 7),
    }
    return out


def test_every_dtype_reads_bit_exact_in_file_order(tmp_path) -> None:
    path = tmp_path / "all.safetensors"
    save_file(_all_dtypes(), str(path), metadata={"format": "pt", "note": "x"})
    want = load_file(str(path))
    with TensorStream([path], "test file") as s:
        assert s.metadata == {"format": "pt", "note": "x"}
        offsets = [s._entries[k].start for k in s.keys()]
        assert offsets == sorted(offsets) and set(s.keys()) == set(want)
        for k, t in s.items():
            assert s.meta(k).shape == want[k].shape and s.meta(k).dtype == want[k].dtype
            assert t.dtype == want[k].dtype and t.shape == want[k].shape, k
            assert torch.equal(t.reshape(-1).view(torch.uint8), want[k].reshape(-1).view(torch.uint8)), (
                k
            )  # bits
            assert t.is_contiguous() and t.untyped_storage().nbytes() == t.nbytes  # a buffer of its own
        assert [k for k, _ in s.items(["scalar", "bool"])] == [k for k in s.keys() if k in ("scalar", "bool")]


def test_staged_reads_share_one_buffer(tmp_path) -> None:
    path = tmp_path / "two.safetensors"
    save_file({"a": torch.arange(6.0).reshape(2, 3), "b": torch.arange(4, dtype=torch.int16)}, str(path))
    with TensorStream([path]) as s:
        a = s.read("a", staged=True)
        assert s.is_staged(a) and torch.equal(a, torch.arange(6.0).reshape(2, 3))
        kept = a.clone()
        b = s.read("b", staged=True)  # overwrites the bytes `a` showed
        assert s.is_staged(b) and torch.equal(b, torch.arange(4, dtype=torch.int16))
        assert a.data_ptr() == b.data_ptr() and not torch.equal(a, kept)
        assert not s.is_staged(kept) and not s.is_staged(s.read("a"))


def test_shards_archives_and_the_last_file_wins(tmp_path) -> None:
    save_file({"a": torch.ones(2), "b": torch.zeros(3)}, str(tmp_path / "1.safetensors"))
    torch.save({"state_dict": {"b": torch.full((3,), 7.0), "c": torch.arange(4)}}, tmp_path / "2.pt")
    with TensorStream([tmp_path / "1.safetensors", tmp_path / "2.pt"], "shard") as s:
        assert sorted(s.keys()) == ["a", "b", "c"]
        assert torch.equal(s.read("b"), torch.full((3,), 7.0)) and torch.equal(s.read("c"), torch.arange(4))
        assert torch.equal(s.read("a"), torch.ones(2))


def _patched(tmp_path: Path, old: bytes, new: bytes) -> Path:
    """A valid file whose header text has `old` replaced by `new` (same length, so the sizes stay valid)."""
    path = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(2, 3)}, str(path))
    data = path.read_bytes()
    assert len(old) == len(new) and data.count(old) == 1
    path.write_bytes(data.replace(old, new))
    return path


@pytest.mark.parametrize(
    "old,new,message",
    [(b'"F32"', b'"X32"', r"bad\.safetensors: tensor w has dtype X32, which cannot be loaded here; expected a W"),
     (b"[2,3]", b"[2,4]", r"bad\.safetensors: a damaged safetensors file \(tensor w: 24 bytes for shape \[2, 4\]")],
)  # fmt: skip
def test_bad_entries_are_one_clear_line(tmp_path, old, new, message) -> None:
    path = _patched(tmp_path, old, new)
    with pytest.raises(InputError, match=message):
        TensorStream([path], "W file", expected="a W .safetensors file")


def test_whole_file_problems_keep_the_shared_messages(tmp_path) -> None:
    path = tmp_path / "cut.safetensors"
    save_file({"w": torch.zeros(64)}, str(path))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(InputError, match=r"W file .*cut\.safetensors: truncated: .*; expected a W file"):
        TensorStream([path], "W file", expected="a W file")
    (tmp_path / "evil.pt").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(InputError, match="bare Python pickle; refused"):
        TensorStream([tmp_path / "evil.pt"], "W file")


_PEAK = """
import json, sys
import torch
from safetensors.torch import load_file
from networks.tensor_stream import TensorStream
def peak():  # VmHWM: the peak resident set since the reset below
    line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # forget the peak of the imports
base = peak()
if sys.argv[2] == "stream":
    with TensorStream([sys.argv[1]]) as s:
        kept = dict(s.items())
else:  # the memory-mapped reader, copied out as a model load would
    kept = {k: v.clone() for k, v in load_file(sys.argv[1]).items()}
print(json.dumps({"growth": peak() - base, "kept": sum(t.nbytes for t in kept.values())}))
"""


def _growth(path: Path, how: str) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_PEAK), str(path), how],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout)


def test_reading_everything_costs_the_file_size_once(tmp_path) -> None:
    path = tmp_path / "big.safetensors"
    size = 8 * 16 * 2**20  # 128 MiB in 8 tensors
    save_file({f"t{i}": torch.full((4 * 2**20,), float(i)) for i in range(8)}, str(path))
    stream, mapped = _growth(path, "stream"), _growth(path, "load_file")
    assert stream["kept"] == mapped["kept"] == size
    # kept tensors plus at most one tensor's worth of slack; the mapped reader holds the pages as well
    assert stream["growth"] < size * 1.15, stream
    assert mapped["growth"] > size * 1.8, mapped
