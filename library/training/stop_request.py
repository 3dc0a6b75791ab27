"""Ctrl-C during training: the first one asks the loop to stop after the current step (which then saves
the network and a resumable state); a second one, or any outside the loop, stops at once."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any


class StopRequest:
    def __init__(self) -> None:
        self.requested = False
        self.armed = False
        self._previous: Any = None
        self._installed = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread; Ctrl-C then stops at once
        self._previous = signal.signal(signal.SIGINT, self._handle)
        self._installed = True

    def restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def arm(self) -> None:
        """From now on the first Ctrl-C is a stop request (a step can finish and be saved)."""
        self.armed = True

    def disarm(self) -> None:
        self.armed = False

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.armed or self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nCtrl-C: finishing the current step, then saving the network and a resumable state "
            "(press Ctrl-C again to stop at once)",
            file=sys.stderr,
            flush=True,
        )
