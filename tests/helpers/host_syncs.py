"""Where a training step would make the host wait for the GPU, found on the CPU.

On CUDA, reading a device tensor on the host (`.item()`, `.tolist()`, `.cpu()`, `bool(t)`, ...) waits for
every kernel queued before it, and so does a blocking upload (`t.to(device)` of a host tensor,
`torch.tensor(..., device=...)`). Made after the denoiser's forward is queued, such a call stalls the host
until the forward has run, and the GPU then idles while the host queues the backward.

The probe wraps those calls while a step runs and records each call made directly by the project's code
or by diffusers/transformers (calls torch makes inside its own functions are left out), in order, and
whether the denoiser had been called yet in that step. On the CPU every tensor is a host tensor, so a
recorded call is one that *would* sync on CUDA if its tensor lives on the device; the tests read the list.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = str(Path(__file__).resolve().parents[2]) + "/"
_WATCHED_PACKAGES = ("/diffusers/", "/transformers/")
_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@dataclass
class Event:
    call: str  # e.g. "tolist", "to", "torch.tensor"
    site: str  # "path/in/repo.py:line" of the caller
    after_forward: bool  # the denoiser had already been called in this step


@dataclass
class StepSyncs:
    steps: list[list[Event]] = field(default_factory=list)

    def after_forward(self) -> list[list[tuple[str, str]]]:
        """Per step, the (call, site) pairs made once the denoiser's forward was queued."""
        return [[(e.call, e.site) for e in step if e.after_forward] for step in self.steps]


class _Recorder:
    def __init__(self) -> None:
        self.on = False
        self.forward_seen = False
        self.events: list[Event] = []

    def note(self, call: str) -> None:
        if not self.on:
            return
        caller = sys._getframe(2)  # 0: note, 1: the wrapper, 2: whoever called the wrapped function
        path = caller.f_code.co_filename
        if path.startswith(REPO):
            site = f"{path[len(REPO) :]}:{caller.f_lineno}"
        elif any(p in path for p in _WATCHED_PACKAGES):
            site = f"{path[path.rindex('-packages/') + 10 :] if '-packages/' in path else path}:{caller.f_lineno}"
        else:
            return
        self.events.append(Event(call, site, self.forward_seen))


def _wrap(rec: _Recorder, owner: object, name: str, label: str, when=None):  # type: ignore[no-untyped-def]
    orig = getattr(owner, name)

    @functools.wraps(orig)
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        if rec.on and (when is None or when(args, kwargs)):
            rec.note(label)
        return orig(*args, **kwargs)

    return orig, wrapper


def _moves(args: tuple, kwargs: dict) -> bool:
    """`t.to(...)` naming a device (or another tensor, whose device it takes): a copy when devices differ."""
    return "device" in kwargs or any(isinstance(a, (torch.device, str, torch.Tensor)) for a in args[1:])


@contextlib.contextmanager
def probe_steps(step_owner: type, step_method: str, denoiser_of) -> Iterator[StepSyncs]:  # type: ignore[no-untyped-def]
    """Record host syncs per call of `step_owner.step_method` (one training micro-batch).

    `denoiser_of(run)` gives the module whose forward marks "the forward is queued" (a pre-hook on it).
    """
    rec, out = _Recorder(), StepSyncs()
    patches = [(torch.Tensor, n, *_wrap(rec, torch.Tensor, n, n)) for n in _READS]
    patches.append((torch.Tensor, "to", *_wrap(rec, torch.Tensor, "to", "to", _moves)))
    for fn in ("tensor", "as_tensor"):
        patches.append((torch, fn, *_wrap(rec, torch, fn, f"torch.{fn}", lambda a, k: "device" in k)))
    step = getattr(step_owner, step_method)
    hooked: dict[int, object] = {}

    def mark(*_):  # type: ignore[no-untyped-def]
        rec.forward_seen = True

    @functools.wraps(step)
    def recorded_step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        module = denoiser_of(self)
        if id(module) not in hooked:
            hooked[id(module)] = module.register_forward_pre_hook(mark)
        rec.events, rec.forward_seen, rec.on = [], False, True
        try:
            return step(self, *args, **kwargs)
        finally:
            rec.on = False
            out.steps.append(rec.events)

    try:
        for owner, name, _orig, wrapper in patches:
            setattr(owner, name, wrapper)
        setattr(step_owner, step_method, recorded_step)
        yield out
    finally:
        setattr(step_owner, step_method, step)
        for owner, name, orig, _wrapper in patches:
            setattr(owner, name, orig)
        for h in hooked.values():
            h.remove()  # type: ignore[attr-defined]
