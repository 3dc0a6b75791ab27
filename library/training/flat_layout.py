"""The flat buffers behind library/training/flat_8bit.py: layout, launch plan and per-tensor state views.

A buffer holds the tensors of one parameter group, device and dtype whose bitsandbytes states are of one
kind:
- 8-bit (blockwise quantized, one absmax per `BLOCK` elements): each tensor starts at a multiple of
  `BLOCK` with zero padding after it, so every absmax block belongs to one tensor;
- 32-bit (fp32 states, which bitsandbytes gives tensors under its `min_8bit_size`, or every tensor at
  `optim_bits=32`): its 32-bit update is elementwise (no per-tensor norm without `max_unorm`, the CPU
  backend's torch ops and the CUDA kernels alike), so the tensors lie back to back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

BLOCK = 256  # elements per absmax block of bitsandbytes' blockwise 8-bit update (checked at layout)


def padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


@dataclass
class Member:
    """One parameter in a flat buffer: elements [start, start + numel), absmax blocks [block, +blocks)
    (no blocks in a 32-bit buffer)."""

    param: torch.nn.Parameter
    index: int  # position in the optimizer's packed state_dict
    gindex: int
    pindex: int
    start: int
    numel: int
    block: int = 0
    blocks: int = 0
    data_ptr: int = 0
    grad_view: torch.Tensor | None = None
    step: int = 0
    active: bool = False  # updated by the launches (it got a grad)
    used: bool = False  # a grad was accumulated before the first step (hook)


@dataclass
class Run:
    """Consecutive active members with one step count: one launch over their slices."""

    lo: int
    hi: int
    step: int
    views: tuple[torch.Tensor | None, ...]  # grad, param, state1, state2, absmax1, absmax2


@dataclass
class Quant:
    """What an 8-bit buffer has beyond a 32-bit one."""

    absmax1: torch.Tensor
    absmax2: torch.Tensor | None
    qmap1: torch.Tensor
    qmap2: torch.Tensor | None
    pad_index: torch.Tensor  # the padding elements, reset to the zero codes after each step
    zero_codes: tuple[int, int | None]


@dataclass
class Flat:
    """The flat buffers of one group's tensors of one device, dtype and state kind (`quant` None: 32-bit)."""

    gindex: int
    members: list[Member]
    data: torch.Tensor
    grad: torch.Tensor
    state1: torch.Tensor
    state2: torch.Tensor | None
    quant: Quant | None
    runs: list[Run] = field(default_factory=list)
    inactive: list[Member] = field(default_factory=list)  # no grad so far: watched for a late one

    def span(self, m: Member) -> int:
        return m.numel if self.quant is None else padded(m.numel)


def _zero_code(qmap: torch.Tensor) -> int:
    """The code whose value in `qmap` is exactly 0 (a padding element at this code dequantizes to 0)."""
    hits = (qmap == 0).nonzero()
    if hits.numel() == 0:
        raise RuntimeError("flat 8-bit optimizer: the quantization map has no exact zero (a bug)")
    return int(hits[0, 0])


def build(
    gindex: int, entries: list[tuple[int, int, torch.nn.Parameter]],
    qmaps: tuple[torch.Tensor, torch.Tensor | None] | None, two: bool,
) -> Flat:  # fmt: skip
    """Buffers for `entries` (state_dict index, index in the group, param), 8-bit where `qmaps` are given;
    each param's data and grad become views of them (a grad already there is kept, and counts as used)."""
    p0 = entries[0][2]
    device, dtype, members, start = p0.device, p0.dtype, [], 0
    for index, pi, p in entries:
        n = p.numel()
        if qmaps is None:
            members.append(Member(p, index, gindex, pi, start, n))
            start += n
        else:
            members.append(Member(p, index, gindex, pi, start, n, start // BLOCK, -(-n // BLOCK)))
            start += padded(n)
    data = torch.zeros(start, dtype=dtype, device=device)
    state = torch.float32 if qmaps is None else torch.uint8
    states = [torch.zeros(start, dtype=state, device=device) for _ in range(1 + two)]
    quant = None
    if qmaps is not None:
        blocks = [torch.zeros(start // BLOCK, dtype=torch.float32, device=device) for _ in range(1 + two)]
        pad = [torch.arange(m.start + m.numel, m.start + padded(m.numel)) for m in members]
        quant = Quant(
            blocks[0], blocks[1] if two else None, qmaps[0], qmaps[1], torch.cat(pad).to(device),
            (_zero_code(qmaps[0]), _zero_code(qmaps[1]) if qmaps[1] is not None else None),
        )  # fmt: skip
    fl = Flat(gindex, members, data, torch.zeros_like(data), states[0], states[1] if two else None, quant)
    reset_padding(fl)  # code 0 is -1.0: with a loaded absmax the padding would not read as 0
    for m in members:
        p = m.param
        view = data[m.start : m.start + m.numel].view(p.shape)
        view.copy_(p.data)
        p.data = view
        m.data_ptr = view.data_ptr()
        m.grad_view = fl.grad[m.start : m.start + m.numel].view(p.shape)
        if p.grad is not None:
            m.grad_view.copy_(p.grad)
            m.used = True
        p.grad = m.grad_view
    return fl


def _launch_views(fl: Flat, lo: int, hi: int) -> tuple[torch.Tensor | None, ...]:
    first, last = fl.members[lo], fl.members[hi - 1]
    e0, e1 = first.start, last.start + fl.span(last)
    q = fl.quant
    b0, b1 = first.block, last.block + last.blocks
    return (
        fl.grad[e0:e1], fl.data[e0:e1], fl.state1[e0:e1],
        None if fl.state2 is None else fl.state2[e0:e1],
        None if q is None else q.absmax1[b0:b1], None if q is None or q.absmax2 is None else q.absmax2[b0:b1],
    )  # fmt: skip


def plan(fl: Flat) -> None:
    """Split the active members into runs of one step count (one run unless some missed steps)."""
    runs: list[Run] = []
    i, members = 0, fl.members
    while i < len(members):
        if not members[i].active:
            i += 1
            continue
        j = i + 1
        while j < len(members) and members[j].active and members[j].step == members[i].step:
            j += 1
        runs.append(Run(i, j, members[i].step, _launch_views(fl, i, j)))
        i = j
    fl.runs = runs
    fl.inactive = [m for m in members if not m.active]


def sync_steps(fl: Flat) -> None:
    for run in fl.runs:
        for m in fl.members[run.lo : run.hi]:
            m.step = run.step


def member_state(fl: Flat, m: Member) -> dict[str, Any]:
    """bitsandbytes' per-tensor state entries (its init_state's keys and order), as views of the flat ones."""
    sl, q, shape = _slices(fl, m), fl.quant, m.param.shape
    state: dict[str, Any] = {"step": m.step, "state1": sl["state1"].view(shape)}
    if q is not None:
        state["qmap1"] = q.qmap1
    if "state2" in sl:
        state["state2"] = sl["state2"].view(shape)
        if q is not None:
            state["qmap2"] = q.qmap2
    state.update((k, sl[k]) for k in ("absmax1", "absmax2") if k in sl)
    return state


def reset_padding(fl: Flat) -> None:
    """The padding's states go into a launch as 0, yet it requantizes them to a code near zero (not
    exactly), which would grow into the tail block's absmax. Setting those bytes to the exact zero code
    (an index fill over the padding only, cheaper than a mask over the buffer) keeps them 0, so each
    block's absmax and the padded params (0 / (0 + eps) = 0) stay what the per-tensor update gives."""
    q = fl.quant
    if q is not None and q.pad_index.numel():
        fl.state1.index_fill_(0, q.pad_index, q.zero_codes[0])
        if fl.state2 is not None:
            fl.state2.index_fill_(0, q.pad_index, q.zero_codes[1])


def check_views(fl: Flat, members: list[Member]) -> None:
    for m in members:
        p = m.param
        if p.data_ptr() != m.data_ptr or (m.active and p.grad is not m.grad_view):
            raise RuntimeError(
                f"flat 8-bit optimizer: parameter {m.pindex} of group {m.gindex} {tuple(p.shape)} no longer "
                "lies in its flat buffer (its .data or .grad was replaced after the layout); this is a bug "
                "(FLAT_8BIT=off runs bitsandbytes' per-tensor loop)"
            )


def take_loaded(fl: Flat, m: Member, loaded: dict[str, Any]) -> None:
    """Copy a loaded per-tensor state into the member's slices; it must be bitsandbytes' layout for the
    buffer's kind (8-bit codes and absmax, or 32-bit states)."""
    q, slices = fl.quant, _slices(fl, m)
    for k, dst in slices.items():
        t = loaded.get(k)
        if not isinstance(t, torch.Tensor) or t.numel() != dst.numel() or t.dtype != dst.dtype:
            raise ValueError(
                f"optimizer state: parameter {m.pindex} of group {m.gindex} has no {k} of {dst.numel()} "
                f"{dst.dtype} elements; expected a state saved by the same optimizer (FLAT_8BIT=off loads others)"
            )
    if q is not None:
        for key, qmap in (("qmap1", q.qmap1), ("qmap2", q.qmap2)):
            t = loaded.get(key)
            if qmap is not None and not (
                isinstance(t, torch.Tensor) and torch.equal(t.to(qmap.device), qmap)
            ):
                raise ValueError(f"optimizer state: parameter {m.pindex} has another quantization map {key}")
    for k, dst in slices.items():
        dst.copy_(loaded[k].flatten())
    m.step = int(loaded["step"])


def clear(fl: Flat, m: Member) -> None:
    """A member without a saved state starts fresh, as bitsandbytes' init_state (zeros)."""
    for t in _slices(fl, m).values():
        t.zero_()


def _slices(fl: Flat, m: Member) -> dict[str, torch.Tensor]:
    """The member's flat state slices under bitsandbytes' state keys."""
    e0, e1, b0, b1, q = m.start, m.start + m.numel, m.block, m.block + m.blocks, fl.quant
    out = {"state1": fl.state1[e0:e1]}
    if fl.state2 is not None:
        out["state2"] = fl.state2[e0:e1]
    if q is not None:
        out["absmax1"] = q.absmax1[b0:b1]
        if q.absmax2 is not None:
            out["absmax2"] = q.absmax2[b0:b1]
    return out
