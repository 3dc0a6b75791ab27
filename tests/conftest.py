"""Shared test fixtures: the package's bundled tokenizers unpacked as plain folders, one thread."""

from __future__ import annotations

import logging
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


_ROOT_LEVEL = logging.getLogger().level


def _drop_console_logging() -> None:
    from library.io.console import _TqdmHandler

    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, _TqdmHandler)]:
        root.removeHandler(h)
    root.setLevel(_ROOT_LEVEL)


@pytest.fixture(autouse=True)
def _no_console_logging_leaks():
    """Scripts' main() installs the console log handler on the root logger at INFO (library/io/console.py);
    a module fixture that runs a script would leave it for later tests' captured stderr. Each test starts
    and ends without it (pytest's own capture handlers are left alone)."""
    _drop_console_logging()
    yield
    _drop_console_logging()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the Triton-interpreter runs that the collected test modules name (`INTERPRETER_CASES`: one
    run's arguments, or a list of them)."""
    from tests.helpers.triton_interpreter import PRESTARTED

    runs: list[tuple[str, ...]] = []
    for item in session.items:
        cases = getattr(getattr(item, "module", None), "INTERPRETER_CASES", None)
        for run in [] if cases is None else [cases] if isinstance(cases[0], str) else cases:
            if tuple(run) not in runs:
                runs.append(tuple(run))
    PRESTARTED.start(runs)


def pytest_sessionfinish(session: pytest.Session) -> None:
    from tests.helpers.triton_interpreter import PRESTARTED

    PRESTARTED.stop()
