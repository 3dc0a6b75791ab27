"""What the scripts print: log lines that never land on a progress bar, without library noise."""

from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"

# Library messages that repeat at every sample or start-up and tell a user nothing here:
# diffusers warns on every .to(dtype) even when no module must stay in float32 (the list is empty);
# transformers notes that its torchvision image processors fall back to PIL, which SDXL pipelines use.
NOISE = (
    "that should be kept in float32: [].",
    "requires torchvision (not installed); falling back to",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in NOISE)


class _TqdmHandler(logging.Handler):
    """Writes above any active progress bar (tqdm.write) instead of onto the end of its line, to the
    sys.stderr of the moment (a caller that swaps stderr, as test capture does, is followed)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


def setup_logging(level: int = logging.INFO, fmt: str = LOG_FORMAT) -> None:
    """Route every logger (ours, diffusers', transformers') through one progress-bar-aware handler."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter(fmt))
    handler.addFilter(_DropNoise())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _TqdmHandler)]:  # called again in one process
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for lib in (diffusers_logging, transformers_logging):
        lib.disable_default_handler()
        lib.enable_propagation()
