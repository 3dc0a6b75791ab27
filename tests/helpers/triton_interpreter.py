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
import threading
from collections.abc import Callable
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


def _env() -> dict[str, str]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *sys.path])  # the Triton this session found
    for name in SWITCHES:
        env.pop(name, None)
    return env


class _Prestarted:
    """Interpreter runs started when the session's tests are collected, one at a time on a thread: the suite
    runs on one intra-op thread, so they use the machine's other core while the tests before them run.
    A test module opts in by naming its run in `INTERPRETER_CASES`; results are the same as a run started
    on demand (same command, same environment)."""

    def __init__(self) -> None:
        self.results: dict[tuple[str, ...], subprocess.CompletedProcess | None] = {}
        self.done: dict[tuple[str, ...], threading.Event] = {}
        self.current: subprocess.Popen | None = None
        self.stopped = False

    def start(self, runs: list[tuple[str, ...]]) -> None:
        if not HAS_TRITON or not runs:
            return
        for args in runs:
            self.done[args] = threading.Event()
        threading.Thread(target=self._work, args=(runs,), daemon=True).start()

    def _work(self, runs: list[tuple[str, ...]]) -> None:
        for args in runs:
            try:
                if not self.stopped:
                    self.current = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=_env(),
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
                    out, err = self.current.communicate(timeout=600)
                    self.results[args] = subprocess.CompletedProcess(args, self.current.returncode, out, err)
            except Exception:  # noqa: BLE001 - the test then runs it itself and reports what happens
                self.results[args] = None
            finally:
                self.done[args].set()

    def take(self, args: tuple[str, ...]) -> subprocess.CompletedProcess | None:
        if args not in self.done:
            return None
        self.done[args].wait()
        return self.results.pop(args, None)

    def stop(self) -> None:
        self.stopped = True
        if self.current is not None and self.current.poll() is None:
            self.current.kill()


PRESTARTED = _Prestarted()


def run_json(*args: str) -> object:
    """`python *args` from the repository root under the interpreter: the JSON of its last stdout line
    (from the run started at collection when there is one). Skips the calling test where Triton is not
    installed."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed (CUDA builds of torch ship it; the torch path is tested alone)")
    done = PRESTARTED.take(args)
    if done is None:
        done = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                              timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


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
