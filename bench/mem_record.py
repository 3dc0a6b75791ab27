"""The CUDA side of `--mem_peak` (bench/bench_train_step.py): record the allocator's history, mark the
phases of the run, and hand the snapshot to bench/mem_peak.py in the same process (nothing is written)."""

from __future__ import annotations

import importlib.util
import inspect
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

MIB = 2**20


MARK_BYTES = 1


def mem_mark(device: torch.device) -> None:
    """A one-byte allocation that `mem_peak.find_marks` finds by this function's name and its size."""
    torch.empty(MARK_BYTES, dtype=torch.uint8, device=device)


def _mem_peak_module() -> Any:
    """bench/mem_peak.py by path (the bench's sd-* variants put sd-scripts' packages first on sys.path)."""
    spec = importlib.util.spec_from_file_location("lohakr_mem_peak", Path(__file__).with_name("mem_peak.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


class MemRecorder:
    """Records from construction on; `mark(name)` before the warm-up ("warmup") and before the timed steps
    ("measured"); `report()` takes the snapshot, stops recording and returns `mem_peak.report`'s dict with
    torch's own peak over the same window beside it."""

    def __init__(self, device: torch.device, max_entries: int, roots: Sequence[str]) -> None:
        record = getattr(torch.cuda.memory, "_record_memory_history", None)
        if device.type != "cuda" or not torch.cuda.is_available():
            raise SystemExit("--mem_peak: needs --device cuda (it reads the CUDA allocator's history)")
        if record is None or not hasattr(torch.cuda.memory, "_snapshot"):
            raise SystemExit(f"--mem_peak: torch {torch.__version__} has no torch.cuda.memory history API")
        options: dict[str, Any] = {}
        if "skip_actions" in inspect.signature(record).parameters:
            # events the report does not count (bench/mem_peak.py): fewer to keep and to convert
            options["skip_actions"] = ["free_completed", "segment_alloc", "segment_free"]
        # context="alloc": a free event carries the stack of the allocation it frees (frees' own stacks
        # are not wanted), stacks="python": C++ frames are slow to gather and say little here
        record("all", context="alloc", stacks="python", max_entries=max_entries, **options)
        self.device, self.max_entries, self.roots = device, max_entries, list(roots)
        self.warmup_peak = 0

    def mark(self, name: str) -> None:
        mem_mark(self.device)
        if name == "warmup":  # torch's own peak over the window the report searches
            torch.cuda.reset_peak_memory_stats(self.device)
        elif name == "measured":
            self.warmup_peak = torch.cuda.max_memory_allocated(self.device)

    def report(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(None)
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        out = _mem_peak_module().report(
            snapshot, device=index, roots=self.roots, mark_func=mem_mark.__name__, mark_size=MARK_BYTES
        )
        peak = max(self.warmup_peak, torch.cuda.max_memory_allocated(self.device))
        out.update(torch_peak_mib=round(peak / MIB, 2), max_entries=self.max_entries)
        out["analysis_s"] = round(time.perf_counter() - t0, 1)
        return out
