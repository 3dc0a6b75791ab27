"""The tokenizers ship inside the package: they load with no ../shared, no hub cache and no network."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from library.io import bundled_tokenizers

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# Known ids of "a photo of an astronaut" (CLIP's are the published example; BOS/EOS 49406/49407).
CLIP_IDS = [49406, 320, 1125, 539, 550, 18376, 49407]
QWEN3_IDS = [64, 6548, 315, 458, 46633]
T5_IDS = [3, 9, 1202, 13, 46, 30059, 1]

_PROBE = """
import json
from library.sdxl.loading import load_sdxl_tokenizers
from library.anima.loading import load_anima_tokenizers
t1, t2 = load_sdxl_tokenizers()
qwen, t5 = load_anima_tokenizers()
text = "a photo of an astronaut"
print(json.dumps({
    "clip": t1(text).input_ids, "clip2": t2(text).input_ids, "clip2_pad": t2.pad_token_id,
    "clip_len": len(t1), "qwen": qwen(text).input_ids, "qwen_len": len(qwen), "qwen_pad": qwen.pad_token,
    "t5": t5(text).input_ids, "t5_len": len(t5),
}))
"""


def test_bundled_tokenizers_load_offline_with_an_empty_hub_home(tmp_path: Path) -> None:
    """A fresh process, run from an unrelated folder with HF_HOME empty and the hub offline."""
    env = {
        "PATH": "/usr/bin:/bin",
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": str(PROJECT_ROOT),
        "OMP_NUM_THREADS": "1",
    }
    (tmp_path / "hf_home").mkdir()
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["clip"] == CLIP_IDS and got["clip2"] == CLIP_IDS and got["clip_len"] == 49408
    assert got["clip2_pad"] == 0  # OpenCLIP bigG pads with "!"
    assert got["qwen"] == QWEN3_IDS and got["qwen_len"] == 151669 and got["qwen_pad"] == "<|endoftext|>"
    assert got["t5"] == T5_IDS and got["t5_len"] == 32100
    assert list((tmp_path / "hf_home").iterdir()) == []  # nothing was cached or downloaded


def test_licence_notices_ship_with_the_data() -> None:
    data = bundled_tokenizers.DATA_DIR
    assert "MIT License" in (data / "LICENSE-MIT-CLIP.txt").read_text(encoding="utf-8")
    assert "Apache License" in (data / "LICENSE-Apache-2.0.txt").read_text(encoding="utf-8")
    readme = (data / "README.md").read_text(encoding="utf-8")
    for name in bundled_tokenizers.BUNDLED:
        assert f"`{name}/`" in readme


def test_pyproject_declares_the_data_as_package_data() -> None:
    """A non-editable install copies package data only when pyproject lists it."""
    import tomllib

    cfg = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = cfg["tool"]["setuptools"]["package-data"]["library.io"]
    package_dir = bundled_tokenizers.DATA_DIR.parent  # library/io, the package that holds the data
    shipped = {p.relative_to(package_dir) for p in bundled_tokenizers.DATA_DIR.rglob("*") if p.is_file()}
    matched = {f for f in shipped if any(f.match(pat) for pat in patterns)}
    assert matched == shipped


def test_explicit_folders_win_and_bad_ones_are_named(tokenizers_dir: Path, tmp_path: Path) -> None:
    from library.anima.loading import load_anima_tokenizers

    q, t = load_anima_tokenizers(tokenizers_dir / "qwen3_06b", tokenizers_dir / "t5_old")
    assert (
        q("a photo of an astronaut").input_ids == QWEN3_IDS
        and t("a photo of an astronaut").input_ids == T5_IDS
    )
    # the text encoder's own folder is read when it holds a tokenizer
    q2, _ = load_anima_tokenizers(None, None, tokenizers_dir / "qwen3_06b")
    assert q2.get_vocab() == q.get_vocab()
    with pytest.raises(FileNotFoundError, match="--qwen3_tokenizer_path .*empty"):
        (tmp_path / "empty").mkdir()
        load_anima_tokenizers(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="--t5_tokenizer_path .*missing_t5"):
        load_anima_tokenizers(None, tmp_path / "missing_t5")


def test_missing_package_data_is_one_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(bundled_tokenizers, "DATA_DIR", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="reinstall the package"):
        bundled_tokenizers.extract_bundled("clip", tmp_path / "out")
    with pytest.raises(ValueError, match="no bundled tokenizer 'bert'"):
        bundled_tokenizers.extract_bundled("bert", tmp_path / "out")


def _project_files(skip_dirs: set[str]) -> list[Path]:
    """The files of the project: in a git checkout those git tracks or would add (ignored folders, such as a
    developer's copies of other branches, are not the project's), else every file under the root."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=PROJECT_ROOT, capture_output=True, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return sorted(PROJECT_ROOT.rglob("*"))
    return sorted(PROJECT_ROOT / name for name in out.decode().split("\0") if name)


def test_no_code_reads_the_workshop_folder() -> None:
    """`../shared` exists only where the project is developed; a user's clone has none."""
    skip_dirs = {
        ".git",
        "build",
        "dist",
        "baselines",
        "demo_out",
        ".pytest_cache",
        ".ruff_cache",
        "__pycache__",
    }
    needles = ("../shared", '"shared"', "'shared'", "/shared/")
    offenders = []
    for path in _project_files(skip_dirs):
        rel = path.relative_to(PROJECT_ROOT)
        if not path.is_file() or skip_dirs & set(rel.parts) or path == Path(__file__):
            continue
        if path.suffix not in (".py", ".toml", ".cfg", ".sh") and rel.parts[0] != ".ci":
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        offenders += [f"{rel}: {n}" for n in needles if n in text]
    assert offenders == []
