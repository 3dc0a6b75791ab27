"""Shared test fixtures: paths to the real tokenizer data that ships beside the project."""

from __future__ import annotations

from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TOKENIZERS_DIR = PROJECT_ROOT.parent / "shared" / "data" / "tokenizers"


@pytest.fixture(scope="session")
def tokenizers_dir() -> Path:
    if not TOKENIZERS_DIR.is_dir():
        raise FileNotFoundError(
            f"tokenizer data not found at {TOKENIZERS_DIR}; it ships in ../shared/data/tokenizers"
        )
    return TOKENIZERS_DIR


@pytest.fixture(scope="session")
def clip_tokenizer_dir(tokenizers_dir: Path) -> Path:
    return tokenizers_dir / "clip"


@pytest.fixture(autouse=True, scope="session")
def _single_intra_op_thread():
    """Tiny models run fastest on one thread; it also keeps test timings stable on a loaded machine."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
