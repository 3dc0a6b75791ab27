"""Run one trainer script with step-timing hooks (bench/bench_e2e.py starts it; not for direct use).

    python bench/e2e_child.py TRAINER.py [trainer args...]

Environment: E2E_HOOK_OUT (a JSON-lines file to append to), E2E_T0 (the parent's clock when it started
this process), E2E_TORCHVISION_SHIM (a folder with a stand-in torchvision, for a CPU box only),
E2E_PROFILE_STEP (profile the step after this optimizer step: one "profile" line, see StepProfiler).

The hooks are the same for every trainer, ours or sd-scripts': a global optimizer post-step hook
(torch.optim) notes the wall time after each optimizer step, synchronising CUDA first so the time is
the GPU's, and `Accelerator.backward` is wrapped to keep the loss it was given. One line per step and a
last line with the peak memory are appended to E2E_HOOK_OUT, so a run that dies still leaves its steps.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import runpy
import sys
import threading
import time
from pathlib import Path

# Kernel names by what they do; the first matching group wins, the rest is "other".
KERNEL_GROUPS = (
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "mm_")),
    ("conv", ("conv", "winograd", "implicit", "cudnn", "fprop", "dgrad", "wgrad")),
    ("norm", ("norm",)),
    ("optimizer", ("adam", "optimizer", "kpercentile", "quantize")),
    ("copy/cast", ("memcpy", "memset", "copy", "convert", "cast", "fill")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "triton_")),
    ("reduce", ("reduce",)),
)


def kernel_group(name: str) -> str:
    low = name.lower()
    return next((group for group, keys in KERNEL_GROUPS if any(k in low for k in keys)), "other")


class StepProfiler:
    """Profiles exactly one optimizer step (from one post-step hook to the next) with torch.profiler.

    The line it writes tells whether the step is GPU-bound: the summed device time of the step's kernels
    against the step's wall time (the profiler's own overhead included), then the time per kernel group
    and the kernels that took longest. On a machine without CUDA it records CPU operators instead.
    """

    def __init__(self, torch, top: int = 25) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.cuda = torch.cuda.is_available()
        self.prof = profile(activities=[ProfilerActivity.CUDA if self.cuda else ProfilerActivity.CPU])
        self.top = top

    def start(self) -> None:
        self.prof.__enter__()
        self.t = time.perf_counter()

    def stop(self, torch) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.t
        self.prof.__exit__(None, None, None)
        kernels: dict[str, list] = {}
        for ev in self.prof.events():
            us = ev.device_time if self.cuda else ev.cpu_time_total
            if self.cuda and ev.device_type.name != "CUDA":
                continue
            if not self.cuda and ev.cpu_parent is not None:  # top-level operators only: no double counting
                continue
            k = kernels.setdefault(ev.name, [0.0, 0])
            k[0] += us
            k[1] += 1
        groups: dict[str, float] = {}
        launches: dict[str, int] = {}  # an eager step that is host-bound shows it in its launch count
        for name, (us, calls) in kernels.items():
            groups[kernel_group(name)] = groups.get(kernel_group(name), 0.0) + us
            launches[kernel_group(name)] = launches.get(kernel_group(name), 0) + calls
        busy = sum(groups.values()) / 1e6
        ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])[: self.top]
        return {"profile": True, "activity": "cuda" if self.cuda else "cpu", "wall_s": round(wall, 4),
                "busy_s": round(busy, 4), "busy_fraction": round(busy / wall, 3) if wall else None,
                "groups_s": {g: round(us / 1e6, 4) for g, us in sorted(groups.items(), key=lambda kv: -kv[1])},
                "launches": sum(launches.values()),
                "groups_launches": dict(sorted(launches.items(), key=lambda kv: -kv[1])),
                "top": [{"name": n[:160], "s": round(us / 1e6, 4), "calls": c} for n, (us, c) in ranked]}  # fmt: skip


class MemorySampler:
    """Samples the process's RSS, and the CUDA memory torch has allocated, four times a second and keeps
    when each sampled peak happened, to tell whether a peak falls in loading, caching or the steps (the
    exact peaks come from ru_maxrss and max_memory_allocated; these times are within one period)."""

    def __init__(self, t0: float, period: float = 0.25) -> None:
        self.t0, self.period = t0, period
        self.rss: tuple[float, float | None] = (0.0, None)
        self.gpu: tuple[float, float | None] = (0.0, None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="e2e-memory", daemon=True)
        self._page = os.sysconf("SC_PAGE_SIZE")

    def start(self) -> None:
        self._thread.start()

    def sample(self) -> None:
        t = time.time() - self.t0
        with open("/proc/self/statm", encoding="ascii") as fh:
            rss = int(fh.read().split()[1]) * self._page / 2**20
        if rss > self.rss[0]:
            self.rss = (rss, t)
        # only once the trainer has imported torch (reading stats launches nothing); while its import is
        # still running, sys.modules already holds the module without its `cuda` attribute
        cuda = getattr(sys.modules.get("torch"), "cuda", None)
        if cuda is not None and cuda.is_available() and cuda.is_initialized():
            alloc = cuda.memory_allocated() / 2**20
            if alloc > self.gpu[0]:
                self.gpu = (alloc, t)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(timeout=2 * self.period + 1)
        self.sample()
        row = {"host_rss_peak_at_s": self.rss[1]}
        if self.gpu[1] is not None:
            row["gpu_alloc_peak_at_s"] = self.gpu[1]
        return {k: round(v, 2) for k, v in row.items() if v is not None}


class StepRecorder:
    def __init__(self, out_path: str, t0: float, profile_step: int = 0) -> None:
        self.file = open(out_path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the whole run
        self.t0 = t0
        self.pending: list = []  # losses handed to backward since the last optimizer step
        self.steps = 0
        self.profile_step = profile_step  # 0: no profile
        self.profiler: StepProfiler | None = None
        self.memory = MemorySampler(t0)
        self.memory.start()

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def on_backward(self, loss) -> None:
        self.pending.append(loss.detach())

    def on_step(self, torch) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.time() - self.t0
        losses = [float(x.float().mean()) for x in self.pending]
        self.pending = []
        self.steps += 1
        self.write({"step": self.steps, "t": now, "loss": sum(losses) / len(losses) if losses else None})
        if self.profiler is not None:
            self.write({**self.profiler.stop(torch), "step": self.steps})
            self.profiler = None
        elif self.profile_step and self.steps == self.profile_step:
            self.profiler = StepProfiler(torch)
            self.profiler.start()

    def finish(self, torch) -> None:
        row = {"final": True, "steps": self.steps, "t": time.time() - self.t0,
               "host_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "torch": torch.__version__, "cuda": torch.version.cuda, **self.memory.stop()}  # fmt: skip
        if torch.cuda.is_available():
            row["gpu_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
            row["gpu_peak_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
            row["gpu_name"] = torch.cuda.get_device_name()
        self.write(row)
        self.file.close()


def _hide_torchvision_then_shim(shim: str) -> None:
    """Make transformers/diffusers record torchvision as absent (they cache that), then put the stand-in
    on the path for sd-scripts' own `from torchvision import transforms`."""
    from transformers.utils import import_utils as tf_imports

    tf_imports.is_torchvision_available()  # lru_cache'd: False while the shim is not yet importable
    import diffusers.utils.import_utils  # noqa: F401 - decides its torchvision flag at import

    sys.path.insert(1, shim)


def install_hooks(rec: StepRecorder):
    import accelerate
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(lambda opt, args, kwargs: rec.on_step(torch))
    plain_backward = accelerate.Accelerator.backward

    def backward(self, loss, **kwargs):
        rec.on_backward(loss)
        return plain_backward(self, loss, **kwargs)

    accelerate.Accelerator.backward = backward
    atexit.register(rec.finish, torch)
    return torch


def main() -> None:
    script = Path(sys.argv[1]).resolve()
    sys.argv = [str(script), *sys.argv[2:]]
    sys.path.insert(0, str(script.parent))  # as `python script.py` would: the trainer's own packages first
    shim = os.environ.get("E2E_TORCHVISION_SHIM")
    if shim:
        _hide_torchvision_then_shim(shim)
    t0 = float(os.environ.get("E2E_T0", time.time()))
    install_hooks(StepRecorder(os.environ["E2E_HOOK_OUT"], t0, int(os.environ.get("E2E_PROFILE_STEP", "0"))))
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
