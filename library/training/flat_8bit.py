"""One bitsandbytes 8-bit optimizer launch per parameter group instead of one per tensor.

bitsandbytes' 8-bit optimizers update each trainable tensor in a Python loop: a launch (and a device
sync) plus ~0.1 ms of host time per tensor, 2 888 of them for an SDXL LoHa. Their blockwise update treats
blocks of `BLOCK` elements independently: each block has its own absmax, every block reads the same
quantization map, step count and hyperparameters. So the tensors of a group, laid in one flat buffer with
each tensor starting at a multiple of `BLOCK` (zero padding between them), get bit for bit the per-tensor
update from one call of the functional update over the buffer.

The parameters stay the network's own `nn.Parameter` leaves: their `.data` and their `.grad` become views
of the flat buffers (a backward accumulates into an existing grad in place, so the views hold). The
optimizer's state keeps bitsandbytes' per-tensor entries (views into the flat states), and `state_dict`
writes them as bitsandbytes would, so a state saved by either optimizer loads into the other.

What stays on bitsandbytes' own loop: tensors under its 8-bit minimum (`min_8bit_size`, 32-bit states),
tensors with a per-parameter config override, and whole optimizers with per-tensor options (paged,
`max_unorm`, `skip_zeros`) or another update than adam / lion / momentum. `FLAT_8BIT=off` turns it off.

A tensor whose forward did not reach it gets no grad, and bitsandbytes then skips it; the flat update does
the same for tensors that got no grad before its first step (found by grad hooks: the grads are views of
zeros from the start, so `None` cannot tell). Afterwards every such tensor is updated each step, with a
zero grad when it got none, as under `zero_grad(set_to_none=False)` and the graph step: the trainer does
not use it where module dropout decided on the host can leave a grad out for one step only.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

ENV = "FLAT_8BIT"  # on (default where it applies) | off: bitsandbytes' per-tensor loop
BLOCK = 256  # elements per absmax block of bitsandbytes' blockwise 8-bit update (checked at attach)
FLAT_UPDATES = ("adam", "lion", "momentum")  # elementwise within a block, 1-D states
QUANT_KEYS = ("state1", "state2", "absmax1", "absmax2")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def switched_on() -> bool:
    """The switch is not `off` (read at optimizer creation)."""
    return os.environ.get(ENV, "on").strip().lower() != "off"


def _bnb_bases() -> tuple[type, type]:
    from bitsandbytes.optim.optimizer import Optimizer1State, Optimizer2State

    return Optimizer1State, Optimizer2State


def flat_capable(cls: type) -> bool:
    """`cls` is a bitsandbytes one- or two-state optimizer (whether it runs 8-bit is known once built)."""
    try:
        bases = _bnb_bases()
    except ImportError:
        return False
    return isinstance(cls, type) and issubclass(cls, bases)


@functools.cache
def flat_class(cls: type) -> type:
    """`cls` with the flat update mixed in: it behaves as `cls` until `attach_flat` is called."""
    return type(f"Flat{cls.__name__}", (FlatBlockwise8bit, cls), {"__module__": __name__})


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _zero_code(qmap: torch.Tensor) -> int:
    """The code whose value in `qmap` is exactly 0 (a padding element at this code dequantizes to 0)."""
    hits = (qmap == 0).nonzero()
    if hits.numel() == 0:
        raise RuntimeError("flat 8-bit optimizer: the quantization map has no exact zero (a bug)")
    return int(hits[0, 0])


@dataclass
class _Member:
    """One parameter in a flat buffer: elements [start, start + numel), absmax blocks [block, +blocks)."""

    param: torch.nn.Parameter
    index: int  # position in the optimizer's packed state_dict
    gindex: int
    pindex: int
    start: int
    numel: int
    block: int
    blocks: int
    data_ptr: int = 0
    grad_view: torch.Tensor | None = None
    step: int = 0
    active: bool = False  # updated by the launches (it got a grad)
    used: bool = False  # a grad was accumulated before the first step (hook)


@dataclass
class _Run:
    """Consecutive active members with one step count: one launch over their slices."""

    lo: int
    hi: int
    step: int
    views: tuple[torch.Tensor | None, ...]  # grad, param, state1, state2, absmax1, absmax2


@dataclass
class _Flat:
    """The flat buffers of the qualifying tensors of one group (one device and dtype)."""

    gindex: int
    members: list[_Member]
    data: torch.Tensor
    grad: torch.Tensor
    state1: torch.Tensor
    state2: torch.Tensor | None
    absmax1: torch.Tensor
    absmax2: torch.Tensor | None
    qmap1: torch.Tensor
    qmap2: torch.Tensor | None
    pad_index: torch.Tensor  # the padding elements, reset to the zero codes after each step
    zero_codes: tuple[int, int | None]
    runs: list[_Run] = field(default_factory=list)
    inactive: list[_Member] = field(default_factory=list)  # no grad so far: watched for a late one


def _launch_views(fl: _Flat, lo: int, hi: int) -> tuple[torch.Tensor | None, ...]:
    first, last = fl.members[lo], fl.members[hi - 1]
    e0, e1 = first.start, last.start + _padded(last.numel)
    b0, b1 = first.block, last.block + last.blocks
    return (
        fl.grad[e0:e1], fl.data[e0:e1], fl.state1[e0:e1],
        None if fl.state2 is None else fl.state2[e0:e1],
        fl.absmax1[b0:b1], None if fl.absmax2 is None else fl.absmax2[b0:b1],
    )  # fmt: skip


def _plan(fl: _Flat) -> None:
    """Split the active members into runs of one step count (one run unless some missed steps)."""
    runs: list[_Run] = []
    i, members = 0, fl.members
    while i < len(members):
        if not members[i].active:
            i += 1
            continue
        j = i + 1
        while j < len(members) and members[j].active and members[j].step == members[i].step:
            j += 1
        runs.append(_Run(i, j, members[i].step, _launch_views(fl, i, j)))
        i = j
    fl.runs = runs
    fl.inactive = [m for m in members if not m.active]


def _sync_steps(fl: _Flat) -> None:
    for run in fl.runs:
        for m in fl.members[run.lo : run.hi]:
            m.step = run.step


def _member_state(fl: _Flat, m: _Member) -> dict[str, Any]:
    """bitsandbytes' per-tensor state entries (its init_state's keys and order), as views of the flat ones."""
    e0, e1, shape = m.start, m.start + m.numel, m.param.shape
    state: dict[str, Any] = {"step": m.step, "state1": fl.state1[e0:e1].view(shape), "qmap1": fl.qmap1}
    if fl.state2 is not None:
        state.update(state2=fl.state2[e0:e1].view(shape), qmap2=fl.qmap2)
    state["absmax1"] = fl.absmax1[m.block : m.block + m.blocks]
    if fl.absmax2 is not None:
        state["absmax2"] = fl.absmax2[m.block : m.block + m.blocks]
    return state


class FlatBlockwise8bit:
    """Mixed in before a bitsandbytes optimizer class (`flat_class`); `attach_flat` lays out the buffers.

    The methods below fall back to bitsandbytes' own until then, and for the tensors the flat update does
    not take."""

    _flats: list[_Flat] | None = None
    _rest: list[tuple[int, int, torch.nn.Parameter]]
    _hooks: list[Any]
    _first_step: bool

    # ------------------------------------------------------------------ layout
    def runs_8bit(self) -> bool:
        opt: Any = self
        return opt.args.optim_bits == 8

    def flat_blockers(self) -> str | None:
        """Why the optimizer as configured cannot take the flat update, or None."""
        opt: Any = self
        if opt.optimizer_name not in FLAT_UPDATES:
            return f"update {opt.optimizer_name!r} is not one of {FLAT_UPDATES}"
        if opt.is_paged:
            return "paged states"
        if opt.args.max_unorm > 0 or opt.args.skip_zeros:
            return "max_unorm / skip_zeros are per-tensor options"
        return None

    @torch.no_grad()
    def attach_flat(self) -> tuple[int, int, int]:
        """Move the qualifying tensors into flat buffers (after the network is on its device and dtype,
        before the first step). Returns (tensors flattened, flat buffers, tensors left to the loop)."""
        opt: Any = self
        why = self.flat_blockers() if self.runs_8bit() else "32-bit states"
        if why is not None or any(len(s) for s in opt.state.values()):
            raise RuntimeError(f"flat 8-bit optimizer: attach_flat after a step or with {why} (a bug)")
        opt.check_overrides()  # module overrides become per-parameter configs, which stay per tensor
        if "dynamic" not in opt.name2qmap:
            opt.fill_qmap()
        overridden = set(opt.mng.index2config)
        keys: dict[tuple[int, torch.device, torch.dtype], list[tuple[int, torch.nn.Parameter]]] = {}
        self._rest, index = [], 0
        for gi, group in enumerate(opt.param_groups):
            for pi, p in enumerate(group["params"]):
                takes = (
                    p.requires_grad and p.dtype in FLOAT_DTYPES and p.numel() >= opt.args.min_8bit_size
                    and (gi, pi) not in overridden and id(p) not in opt.mng.pid2config
                )  # fmt: skip
                if takes:
                    keys.setdefault((gi, p.device, p.dtype), []).append((index, p))
                else:
                    self._rest.append((gi, pi, p))
                index += 1
        pindex = {id(p): pi for g in opt.param_groups for pi, p in enumerate(g["params"])}
        flats = []
        for (gi, device, dtype), entries in keys.items():
            if len(entries) < 2:  # nothing to gain: bitsandbytes' loop keeps it
                self._rest.extend((gi, pindex[id(p)], p) for _, p in entries)
                continue
            flats.append(self._layout(gi, device, dtype, [(i, pindex[id(p)], p) for i, p in entries]))
        self._flats, self._first_step = (flats or None), True  # None: bitsandbytes' step throughout
        self._hooks = [
            m.param.register_post_accumulate_grad_hook(_marker(m)) for f in flats for m in f.members
        ]
        return sum(len(f.members) for f in flats), len(flats), len(self._rest)

    def _layout(
        self, gindex: int, device: torch.device, dtype: torch.dtype,
        entries: list[tuple[int, int, torch.nn.Parameter]],
    ) -> _Flat:  # fmt: skip
        opt: Any = self
        members, start = [], 0
        for index, pi, p in entries:
            n = p.numel()
            members.append(_Member(p, index, gindex, pi, start, n, start // BLOCK, -(-n // BLOCK)))
            start += _padded(n)
        two = isinstance(self, _bnb_bases()[1])
        qmap1 = opt.name2qmap["dynamic"] = opt.name2qmap["dynamic"].to(device)
        qmap2 = None
        if two:
            qmap2 = opt.name2qmap["udynamic"] = opt.name2qmap["udynamic"].to(device)
        blocks = start // BLOCK
        data = torch.zeros(start, dtype=dtype, device=device)
        pad = [torch.arange(m.start + m.numel, m.start + _padded(m.numel)) for m in members]
        codes = [torch.zeros(start, dtype=torch.uint8, device=device) for _ in range(1 + two)]
        fl = _Flat(
            gindex, members, data, torch.zeros_like(data), codes[0], codes[1] if two else None,
            torch.zeros(blocks, dtype=torch.float32, device=device),
            torch.zeros(blocks, dtype=torch.float32, device=device) if two else None,
            qmap1, qmap2, torch.cat(pad).to(device),
            (_zero_code(qmap1), _zero_code(qmap2) if qmap2 is not None else None),
        )  # fmt: skip
        _reset_padding(fl)  # code 0 is -1.0: with a loaded absmax the padding would not read as 0
        for m in members:
            p = m.param
            view = data[m.start : m.start + m.numel].view(p.shape)
            view.copy_(p.data)
            p.data = view
            m.data_ptr = view.data_ptr()
            m.grad_view = fl.grad[m.start : m.start + m.numel].view(p.shape)
            if p.grad is not None:  # a grad accumulated before the layout is kept, and counts as used
                m.grad_view.copy_(p.grad)
                m.used = True
            p.grad = m.grad_view
        _check_block_size(opt, members[0])
        return fl

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        if self._flats is None:  # the base class's own step, not its profiling wrapper (hooks run once)
            from bitsandbytes.optim.optimizer import Optimizer8bit

            return Optimizer8bit.step(self, closure)
        opt: Any = self
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not opt.initialized:
            opt.check_overrides()
            opt.to_gpu()
            opt.initialized = True
        if self._first_step:
            self._begin()
        for fl in self._flats:
            self._activate_late(fl)
            _check_views(fl, fl.members[:1] + fl.members[-1:])
            self._update(fl)
        for gi, pi, p in self._rest:  # bitsandbytes' own per-tensor update (no device sync: not paged)
            if p.grad is None:
                continue
            group = opt.param_groups[gi]
            if len(opt.state[p]) == 0:
                opt.init_state(group, p, gi, pi)
            opt.update_step(group, p, gi, pi)
        return loss

    def _begin(self) -> None:
        """First step: the tensors that got a grad are the active ones; the others lose their grad view."""
        for h in self._hooks:
            h.remove()
        self._hooks, self._first_step = [], False
        for fl in self._flats or []:
            for m in fl.members:
                g = m.param.grad
                if g is not None and g is not m.grad_view:  # a grad assigned over the view: take it in
                    m.grad_view.copy_(g)
                    m.param.grad, m.used = m.grad_view, True
                if not m.used:
                    m.param.grad = None
                m.active = m.used
                self._install_state(fl, m)
            _check_views(fl, fl.members)
            _plan(fl)

    def _install_state(self, fl: _Flat, m: _Member) -> None:
        opt: Any = self
        if m.active and len(opt.state.get(m.param, ())) == 0:
            opt.state[m.param] = _member_state(fl, m)

    def _activate_late(self, fl: _Flat) -> None:
        """A tensor without a grad so far that has one now (autograd allocated it): bring it in."""
        late = [m for m in fl.inactive if m.param.grad is not None]
        if not late:
            return
        _sync_steps(fl)
        for m in late:
            m.grad_view.copy_(m.param.grad)
            m.param.grad, m.active = m.grad_view, True
            self._install_state(fl, m)
        _plan(fl)

    def _update(self, fl: _Flat) -> None:
        from bitsandbytes import functional as F

        opt: Any = self
        group = opt.param_groups[fl.gindex]
        config = opt.get_config(fl.gindex, fl.members[0].pindex, group)
        betas, two = config["betas"], fl.state2 is not None
        for run in fl.runs:
            run.step += 1
            g, p, s1, s2, a1, a2 = run.views
            if two:  # the argument lists of bitsandbytes' two- and one-state update_step
                extra = (betas[2] if len(betas) >= 3 else 0.0, config.get("alpha", 0.0))
                q2: torch.Tensor | None = fl.qmap2
            else:
                extra, q2 = (0.0, 0.0), None
            F.optimizer_update_8bit_blockwise(
                opt.optimizer_name, g, p, s1, s2, betas[0], betas[1], *extra, config["eps"], run.step,
                config["lr"], fl.qmap1, q2, a1, a2, config["weight_decay"], gnorm_scale=1.0,
                skip_zeros=config["skip_zeros"],
            )  # fmt: skip
        _reset_padding(fl)

    # ------------------------------------------------------------------ grads
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Flat grads are zeroed in place (one op per buffer: freeing them would break the views)."""
        if self._flats is None:
            return super().zero_grad(set_to_none)  # type: ignore[misc]
        for fl in self._flats:
            fl.grad.zero_()
        rest = [p for _, _, p in self._rest if p.grad is not None]
        if set_to_none:
            for p in rest:
                p.grad = None
        elif rest:
            for p in rest:
                p.grad.requires_grad_(False)
            torch._foreach_zero_([p.grad for p in rest])

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """bitsandbytes' per-tensor state: the flat tensors' entries are copied out of the flat buffers."""
        if self._flats is None:
            return super().state_dict()  # type: ignore[misc]
        opt: Any = self
        wrapped = opt._FSDP_WRAPPED_QUANT_STATE_KEY
        for fl in self._flats:
            _sync_steps(fl)
            for m in fl.members:
                if len(opt.state.get(m.param, ())):
                    opt.state[m.param]["step"] = m.step
        sd = super().state_dict()  # type: ignore[misc]
        for fl in self._flats:
            for m in fl.members:
                entry = sd["state"].get(m.index)
                if entry and wrapped in entry:
                    quant = entry[wrapped]
                    for k in QUANT_KEYS:
                        if k in quant:
                            quant[k] = quant[k].clone()
        return sd

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any], move_to_device: bool = True) -> None:
        """bitsandbytes' load, then the flat tensors' states are copied into the flat buffers."""
        super().load_state_dict(state_dict, move_to_device)  # type: ignore[misc]
        if self._flats is None:
            return
        opt: Any = self
        for fl in self._flats:
            for m in fl.members:
                loaded = opt.state.get(m.param)
                if loaded:
                    _take_loaded(fl, m, loaded)
                    opt.state[m.param] = _member_state(fl, m)
                else:  # no state saved for it: fresh, as bitsandbytes' init_state would make it
                    m.step = 0
                    _clear(fl, m)
                    opt.state.pop(m.param, None)
                    self._install_state(fl, m)
            if not self._first_step:
                _check_views(fl, fl.members)
                _plan(fl)


def _reset_padding(fl: _Flat) -> None:
    """The padding's states go into a launch as 0, yet it requantizes them to a code near zero (not
    exactly), which would grow into the tail block's absmax. Setting those bytes to the exact zero code
    (an index fill over the padding only, cheaper than a mask over the buffer) keeps them 0, so each
    block's absmax and the padded params (0 / (0 + eps) = 0) stay what the per-tensor update gives."""
    if fl.pad_index.numel():
        fl.state1.index_fill_(0, fl.pad_index, fl.zero_codes[0])
        if fl.state2 is not None:
            fl.state2.index_fill_(0, fl.pad_index, fl.zero_codes[1])


def _marker(m: _Member) -> Any:
    def hook(_p: torch.Tensor) -> None:
        m.used = True

    return hook


def _check_block_size(opt: Any, m: _Member) -> None:
    """bitsandbytes sizes each tensor's absmax by its block size: ours must be the same."""
    probe = torch.zeros(m.numel, device=m.param.device)
    opt.init_state(opt.param_groups[m.gindex], probe, m.gindex, m.pindex)
    blocks = opt.state.pop(probe)["absmax1"].numel()
    if blocks != m.blocks:
        raise RuntimeError(
            f"flat 8-bit optimizer: bitsandbytes uses {blocks} absmax blocks for {m.numel} elements, "
            f"not {m.blocks} (block size {BLOCK}); this bitsandbytes is not supported (FLAT_8BIT=off)"
        )


def _check_views(fl: _Flat, members: list[_Member]) -> None:
    for m in members:
        p = m.param
        if p.data_ptr() != m.data_ptr or (m.active and p.grad is not m.grad_view):
            raise RuntimeError(
                f"flat 8-bit optimizer: parameter {m.pindex} of group {m.gindex} {tuple(p.shape)} no longer "
                "lies in its flat buffer (its .data or .grad was replaced after the layout); this is a bug "
                "(FLAT_8BIT=off runs bitsandbytes' per-tensor loop)"
            )


def _take_loaded(fl: _Flat, m: _Member, loaded: dict[str, Any]) -> None:
    """Copy a loaded per-tensor state into the member's slices; it must be bitsandbytes' 8-bit layout."""
    want = {"state1": m.numel, "absmax1": m.blocks}
    if fl.state2 is not None:
        want.update(state2=m.numel, absmax2=m.blocks)
    for k, n in want.items():
        t = loaded.get(k)
        dtype = torch.uint8 if k.startswith("state") else torch.float32
        if not isinstance(t, torch.Tensor) or t.numel() != n or t.dtype != dtype:
            raise ValueError(
                f"optimizer state: parameter {m.pindex} of group {m.gindex} has no 8-bit {k} of {n} "
                f"elements; expected a state saved by the same 8-bit optimizer (FLAT_8BIT=off loads others)"
            )
    for key, q in (("qmap1", fl.qmap1), ("qmap2", fl.qmap2)):
        t = loaded.get(key)
        if q is not None and t is not q and not torch.equal(t.to(q.device), q):
            raise ValueError(f"optimizer state: parameter {m.pindex} has another quantization map {key}")
    e0, e1, b0, b1 = m.start, m.start + m.numel, m.block, m.block + m.blocks
    fl.state1[e0:e1].copy_(loaded["state1"].flatten())
    fl.absmax1[b0:b1].copy_(loaded["absmax1"])
    if fl.state2 is not None:
        fl.state2[e0:e1].copy_(loaded["state2"].flatten())
        fl.absmax2[b0:b1].copy_(loaded["absmax2"])
    m.step = int(loaded["step"])


def _clear(fl: _Flat, m: _Member) -> None:
    """A member without a saved state starts fresh, as bitsandbytes' init_state (zeros)."""
    e0, e1, b0, b1 = m.start, m.start + m.numel, m.block, m.block + m.blocks
    for t in (fl.state1, fl.state2):
        if t is not None:
            t[e0:e1].zero_()
    for t in (fl.absmax1, fl.absmax2):
        if t is not None:
            t[b0:b1].zero_()


def flatten_optimizer(optimizer: torch.optim.Optimizer, host_module_dropout: bool = False) -> str:
    """Lay out a `flat_class` optimizer's buffers if it can take the flat update; returns the log line."""
    if not isinstance(optimizer, FlatBlockwise8bit) or not optimizer.runs_8bit():
        return ""  # not bitsandbytes, or its 32-bit states: nothing to say
    why = optimizer.flat_blockers()
    if why is None and host_module_dropout:
        why = "module dropout decided on the host can leave a tensor without a grad for one step"
    if why is not None:
        return f"flat 8-bit update: off ({why}); bitsandbytes' per-tensor loop"
    flat, buffers, rest = optimizer.attach_flat()
    if not flat:
        return (
            "flat 8-bit update: off (no group has two tensors of >= min_8bit_size elements); "
            f"{rest} tensor(s) on bitsandbytes' per-tensor loop"
        )
    return (
        f"flat 8-bit update: {flat} tensors in {buffers} flat buffer(s), {buffers} launch(es) per step; "
        f"{rest} tensor(s) on bitsandbytes' per-tensor loop ({ENV}=off turns it off)"
    )
