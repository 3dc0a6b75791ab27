"""What the file tools (inspect, resize, merge) share on the command line: an argument parser whose errors
are one line, and a runner that turns bad input into one `error:` line and keeps a traceback for bugs."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn

from library.tools.file_modules import FileError
from networks.block_weights import BlockWeightError


class ToolError(ValueError):
    """Bad input to a tool (a flag value, a file); the message says which and what is expected."""


class OneLineParser(argparse.ArgumentParser):
    """argparse with its usage dump left out of errors: one `prog: error: …` line, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_ratios(flag: str, values: Sequence[float] | None, n: int) -> list[float]:
    """One multiplier per file (all 1.0 when not given); a count mismatch is an error naming the flag."""
    if values is None:
        return [1.0] * n
    if len(values) != n:
        raise ToolError(f"{flag}: {len(values)} value(s) given for {n} file(s); give one per file")
    return [float(v) for v in values]


def run_tool(prog: str, main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        return main(argv)
    except (ToolError, FileError, FileNotFoundError, BlockWeightError) as e:
        msg = e.args[0] if e.args else str(e)
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - anything else is a bug: keep the traceback, say so in one line
        traceback.print_exc()
        print(f"{prog}: internal error (a bug, please report it with the traceback above)", file=sys.stderr)
        return 70
