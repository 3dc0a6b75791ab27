"""Running Triton kernels on the CPU for the tests: Triton's interpreter, in a child process.

TRITON_INTERPRET=1 must be set before Triton is imported, and must not leak into the test session (the
CUDA tests there run the kernels natively), so the cases run in a child that prints its results as one
JSON line.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from networks.kernels.triton_common import interpreting

ROOT = Path(__file__).resolve().parents[2]
HAS_TRITON = importlib.util.find_spec("triton") is not None
# the kernels' own on/off variables: default (on) in the child
SWITCHES = ("ANIMA_KERNELS", "FP8_DEQUANT_KERNEL", "KRON_KERNEL", "LOHA_KERNEL", "LOHA_RAW_CAST")
# the CUDA tests run the kernels natively: a GPU, Triton, and not the interpreter in this process
ON_GPU = torch.cuda.is_available() and HAS_TRITON and not interpreting()
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device and Triton (and no TRITON_INTERPRET)")


def _run(args: tuple[str, ...], started: list[subprocess.Popen] | None = None) -> tuple[int, str, str]:
    """`python *args` from the repository root under the interpreter: (exit code, stdout, stderr)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *sys.path])  # the Triton this session found
    for name in SWITCHES:
        env.pop(name, None)
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    if started is not None:
        started.append(proc)
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


class _Prestarted:
    """Interpreter runs started when the session's tests are collected, one at a time on a thread: the suite
    runs on one intra-op thread, so they use the machine's other core while the tests before them run.
    A test module opts in by naming its runs in `INTERPRETER_CASES`; a run's result is that of the same
    command started on demand."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.futures: dict[tuple[str, ...], Future] = {}
        self.procs: list[subprocess.Popen] = []

    def start(self, runs: list[tuple[str, ...]]) -> None:
        if HAS_TRITON:
            self.futures.update({args: self.pool.submit(_run, args, self.procs) for args in runs})

    def take(self, args: tuple[str, ...]) -> tuple[int, str, str] | None:
        """The prestarted run's result (waiting for it), or None where there is none or it failed to run."""
        future = self.futures.pop(args, None)
        try:
            return None if future is None else future.result()
        except Exception:  # noqa: BLE001 - the caller then runs it itself and reports what happens
            return None

    def stop(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()


PRESTARTED = _Prestarted()


def run_json(*args: str) -> object:
    """`python *args` from the repository root under the interpreter: the JSON of its last stdout line
    (from the run started at collection when there is one). Skips the calling test where Triton is not
    installed."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed (CUDA builds of torch ship it; the torch path is tested alone)")
    code, out, err = PRESTARTED.take(args) or _run(args)
    assert code == 0, err[-4000:]
    return json.loads(out.strip().splitlines()[-1])


def eager_and_replayed(
    step: Callable[[], list[torch.Tensor]],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """step's results run eagerly on a side stream (which compiles the kernels outside the capture, as the
    trainers' warm-up does), and captured in a CUDA graph, replayed once."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    return eager, captured
