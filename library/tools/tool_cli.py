"""What the file tools (inspect, resize, merge) share on the command line: an argument parser whose errors
are one line, and a runner that turns bad input into one `error:` line and keeps a traceback for bugs."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from typing import NoReturn

from library.io.errors import cli_status


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
    """The tools' error boundary is the scripts' one (library/io/errors.py), with argparse's status 2 for
    bad input: one `prog: error: …` line; a bug keeps its traceback behind one line."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    return cli_status(lambda: main(argv), prog, input_status=2)
