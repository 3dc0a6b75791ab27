"""Shared test fixtures: the package's bundled tokenizers unpacked as plain folders, one thread."""

from __future__ import annotations

from pathlib import Path

import pytest

from library.io.bundled_tokenizers import BUNDLED, extract_bundled


@pytest.fixture(scope="session")
def tokenizers_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """clip/, qwen3_06b/, t5_old/ folders as a user would pass them with a tokenizer flag."""
    root = tmp_path_factory.mktemp("tokenizers")
    for name in BUNDLED:
        extract_bundled(name, root / name)
    return root


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


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """Scripts' main() installs the console log handler on the root logger (library/io/console.py); in one
    test process that would leak into later tests' captured stderr, so each test gets the root back."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
