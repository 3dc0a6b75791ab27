"""Tokenizer data shipped inside the package (library/io/tokenizer_data/), so no script needs the hub.

Each bundled tokenizer is a folder in the layout `transformers` reads, its large files gzip-compressed.
Loading unpacks the folder into a temporary directory, reads it, and removes the directory: a loaded
tokenizer keeps its vocabulary in memory and needs no file afterwards.
"""

from __future__ import annotations

import gzip
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent / "tokenizer_data"
CLIP = "clip"  # both SDXL text encoders
QWEN3 = "qwen3_06b"  # Anima's text encoder
T5 = "t5_old"  # the token ids Anima's LLM adapter embeds
BUNDLED = (CLIP, QWEN3, T5)


def extract_bundled(name: str, dest: str | Path) -> Path:
    """Write the bundled tokenizer `name` as a plain folder `dest` (created); returns it."""
    if name not in BUNDLED:
        raise ValueError(f"no bundled tokenizer {name!r}; expected one of {', '.join(BUNDLED)}")
    src = DATA_DIR / name
    if not src.is_dir():
        raise FileNotFoundError(f"the package's tokenizer data is missing: {src} (reinstall the package)")
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.suffix == ".gz":
            with gzip.open(f, "rb") as fin, open(out / f.stem, "wb") as fout:
                shutil.copyfileobj(fin, fout)
        else:
            shutil.copyfile(f, out / f.name)
    return out


def load_bundled(name: str, loader: Callable[[str], Any]) -> Any:
    """`loader(folder)` called on a temporary unpacked copy of the bundled tokenizer `name`."""
    with tempfile.TemporaryDirectory(prefix=f"tok-{name}-") as tmp:
        return loader(str(extract_bundled(name, Path(tmp) / name)))
