"""The error boundary shared by every command-line script.

Anticipated failures (bad flags, unreadable or foreign files, no space, no permission, Ctrl-C, a state
folder that does not fit the run) end in one line that names the input and says what was expected, with
a non-zero exit status. Anything else is a bug: its traceback is kept, behind one line that says so.
"""

from __future__ import annotations

import errno
import re
import shlex
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from networks.errors import InputError  # noqa: F401  (re-exported: raised across library/)

EXIT_BAD_INPUT = 1
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by SIGINT
EXIT_BUG = 70  # EX_SOFTWARE: an internal error, not the user's input


class TrainingInterrupted(Exception):
    """Ctrl-C during training: the current step finished and the network and a resumable state were saved."""

    def __init__(self, step: int, max_steps: int, network: Path | None, state_dir: Path) -> None:
        super().__init__(step, max_steps, network, state_dir)
        self.step, self.max_steps, self.network, self.state_dir = step, max_steps, network, state_dir
        self.command: str | None = None  # the command that resumes; the entry script fills it in

    def __str__(self) -> str:
        saved = (
            f"network {self.network} and state {self.state_dir}"
            if self.network
            else f"state {self.state_dir}"
        )
        resume = (
            f"; to resume: {self.command}" if self.command else f"; resume with --resume {self.state_dir}"
        )
        return f"interrupted (Ctrl-C) after step {self.step}/{self.max_steps}: saved {saved}{resume}"


def resume_command(launcher: str, argv: Sequence[str], state_dir: Path) -> str:
    """``launcher argv --resume state_dir`` with any earlier ``--resume`` dropped, quoted for a POSIX shell."""
    kept: list[str] = []
    skip = False
    for token in argv:
        if skip:
            skip = False
        elif token == "--resume":
            skip = True
        elif not token.startswith("--resume="):
            kept.append(token)
    return f"{launcher} {shlex.join([*kept, '--resume', str(state_dir)])}"


def _anticipated() -> tuple[type[BaseException], ...]:
    kinds: list[type[BaseException]] = [ValueError, OSError, ImportError, FloatingPointError, MemoryError]
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "OutOfMemoryError"):
        kinds.append(torch.OutOfMemoryError)  # a RuntimeError subclass: listed so it is not called a bug
    return tuple(kinds)


def _one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", " ", text.strip())


def describe(exc: BaseException) -> str:
    """The one line for an anticipated failure."""
    if type(exc).__name__ == "OutOfMemoryError":
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"out of GPU memory ({first}); try a smaller batch or resolution, or --gradient_checkpointing"
    if isinstance(exc, MemoryError):
        return "out of memory (RAM); try a smaller batch or resolution, or close other programs"
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        what = f"{exc.filename}: {exc.strerror}"
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"{what} (expected a path this user may read/write)"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"{what} (free some space on that disk or choose another folder)"
        return what
    return _one_line(str(exc)) or type(exc).__name__


def _close_progress_bars() -> None:
    """A bar left open by the failure would glue the error to its line and redraw itself after it."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        bar.close()


def cli_status(call: Callable[[], Any], prog: str, input_status: int = EXIT_BAD_INPUT) -> int:
    """Run ``call`` inside the boundary; returns the exit status (``call``'s own int, or 0)."""
    try:
        try:
            return _status_of(call())
        finally:
            _close_progress_bars()
    except KeyboardInterrupt:
        print(
            f"{prog}: interrupted (Ctrl-C); stopped at once, no file was left half-written", file=sys.stderr
        )
        return EXIT_INTERRUPTED
    except TrainingInterrupted as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _anticipated() as e:
        print(f"{prog}: error: {describe(e)}", file=sys.stderr)
        return input_status
    except Exception as e:
        print(
            f"{prog}: internal error ({type(e).__name__}): this is a bug, please report it with the "
            "traceback below",
            file=sys.stderr,
        )
        traceback.print_exc()
        return EXIT_BUG


def _status_of(result: Any) -> int:
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def run_cli(
    main: Callable[..., Any], argv: Sequence[str] | None = None, *, prog: str | None = None,
    input_status: int = EXIT_BAD_INPUT,
) -> NoReturn:  # fmt: skip
    """``if __name__ == "__main__"`` of an entry script: ``main(argv)`` inside the boundary, then exit."""
    name = prog or Path(sys.argv[0]).name
    call = (lambda: main()) if argv is None else (lambda: main(list(argv)))
    sys.exit(cli_status(call, name, input_status))
