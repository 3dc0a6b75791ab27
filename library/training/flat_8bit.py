"""One bitsandbytes optimizer launch per parameter group and state kind instead of one per tensor.

bitsandbytes' 8-bit optimizers update each trainable tensor in a Python loop: a launch (and a device
sync) plus ~0.1 ms of host time per tensor, 2 888 of them for an SDXL LoHa, 1 574 for an SDXL LoKr (most
of them under its 8-bit minimum, `min_8bit_size`, so with 32-bit states). Its blockwise 8-bit update
treats blocks of `BLOCK` elements independently (each block its own absmax, every block the same
quantization map, step count and hyperparameters), and its 32-bit update is elementwise. So the tensors
of a group with one kind of state, laid in one flat buffer (8-bit: each starting at a multiple of
`BLOCK`, zero padding between; 32-bit: back to back), get bit for bit the per-tensor update from one call
of the functional update over the buffer (library/training/flat_layout.py).

The parameters stay the network's own `nn.Parameter` leaves: their `.data` and their `.grad` become views
of the flat buffers (a backward accumulates into an existing grad in place, so the views hold). The
optimizer's state keeps bitsandbytes' per-tensor entries (views into the flat states), and `state_dict`
writes them as bitsandbytes would, so a state saved by either optimizer loads into the other.

What stays on bitsandbytes' own loop: tensors with a per-parameter config override, a group's only
tensor of its kind, and whole optimizers with per-tensor options (paged, `max_unorm`, `skip_zeros`) or
another update than adam / lion / momentum. `FLAT_8BIT=off` turns it off. Optimizers that keep 32-bit
states throughout (`optim_bits=32`) get 32-bit buffers only.

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
from typing import Any, NamedTuple

import torch

from library.training import flat_layout as lay
from library.training.flat_layout import Flat, Member

logger = logging.getLogger(__name__)

ENV = "FLAT_8BIT"  # on (default where it applies) | off: bitsandbytes' per-tensor loop
FLAT_UPDATES = ("adam", "lion", "momentum")  # elementwise (within a block when 8-bit), 1-D states
QUANT_KEYS = ("state1", "state2", "absmax1", "absmax2")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Layout(NamedTuple):
    """What `attach_flat` laid out: tensors and buffers of each state kind, tensors left to the loop."""

    tensors8: int
    buffers8: int
    tensors32: int
    buffers32: int
    rest: int


def switched_on() -> bool:
    """The switch is not `off` (read at optimizer creation)."""
    return os.environ.get(ENV, "on").strip().lower() != "off"


def _bnb_bases() -> tuple[type, type]:
    from bitsandbytes.optim.optimizer import Optimizer1State, Optimizer2State

    return Optimizer1State, Optimizer2State


def flat_capable(cls: type) -> bool:
    """`cls` is a bitsandbytes one- or two-state optimizer (8-bit or 32-bit states)."""
    try:
        bases = _bnb_bases()
    except ImportError:
        return False
    return isinstance(cls, type) and issubclass(cls, bases)


@functools.cache
def flat_class(cls: type) -> type:
    """`cls` with the flat update mixed in: it behaves as `cls` until `attach_flat` is called."""
    return type(f"Flat{cls.__name__}", (FlatBlockwise8bit, cls), {"__module__": __name__})


class FlatBlockwise8bit:
    """Mixed in before a bitsandbytes optimizer class (`flat_class`); `attach_flat` lays out the buffers.

    The methods below fall back to bitsandbytes' own until then, and for the tensors the flat update does
    not take."""

    _flats: list[Flat] | None = None
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
        if opt.args.optim_bits not in (8, 32):
            return f"optim_bits {opt.args.optim_bits}"
        return None

    def _state_bits(self, p: torch.nn.Parameter) -> int:
        """The kind of state bitsandbytes' init_state gives `p` (a parameter without an override)."""
        opt: Any = self
        return 8 if self.runs_8bit() and p.numel() >= opt.args.min_8bit_size else 32

    @torch.no_grad()
    def attach_flat(self) -> Layout:
        """Move the qualifying tensors into flat buffers (after the network is on its device and dtype,
        before the first step)."""
        opt: Any = self
        why = self.flat_blockers()
        if why is not None or any(len(s) for s in opt.state.values()):
            raise RuntimeError(f"flat 8-bit optimizer: attach_flat after a step or with {why} (a bug)")
        opt.check_overrides()  # module overrides become per-parameter configs, which stay per tensor
        overridden = set(opt.mng.index2config)
        keys: dict[tuple[int, torch.device, torch.dtype, int], list[tuple[int, int, torch.nn.Parameter]]] = {}
        self._rest, index = [], 0
        for gi, group in enumerate(opt.param_groups):
            for pi, p in enumerate(group["params"]):
                takes = (
                    p.requires_grad and p.dtype in FLOAT_DTYPES
                    and (gi, pi) not in overridden and id(p) not in opt.mng.pid2config
                )  # fmt: skip
                if takes:
                    keys.setdefault((gi, p.device, p.dtype, self._state_bits(p)), []).append((index, pi, p))
                else:
                    self._rest.append((gi, pi, p))
                index += 1
        flats = []
        for (gi, _, _, bits), entries in keys.items():
            if len(entries) < 2:  # nothing to gain: bitsandbytes' loop keeps it
                self._rest.extend((gi, pi, p) for _, pi, p in entries)
                continue
            flats.append(self._layout(gi, entries, bits))
        self._flats, self._first_step = (flats or None), True  # None: bitsandbytes' step throughout
        self._hooks = [
            m.param.register_post_accumulate_grad_hook(_marker(m)) for f in flats for m in f.members
        ]
        f8 = [f for f in flats if f.quant is not None]
        f32 = [f for f in flats if f.quant is None]
        return Layout(
            sum(len(f.members) for f in f8),
            len(f8),
            sum(len(f.members) for f in f32),
            len(f32),
            len(self._rest),
        )

    def _layout(self, gindex: int, entries: list[tuple[int, int, torch.nn.Parameter]], bits: int) -> Flat:
        opt: Any = self
        two = isinstance(self, _bnb_bases()[1])
        if bits == 32:
            return lay.build(gindex, entries, None, two)
        if "dynamic" not in opt.name2qmap:
            opt.fill_qmap()
        device = entries[0][2].device
        qmap1 = opt.name2qmap["dynamic"] = opt.name2qmap["dynamic"].to(device)
        qmap2 = None
        if two:
            qmap2 = opt.name2qmap["udynamic"] = opt.name2qmap["udynamic"].to(device)
        fl = lay.build(gindex, entries, (qmap1, qmap2), two)
        _check_block_size(opt, fl.members[0])
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
            lay.check_views(fl, fl.members[:1] + fl.members[-1:])
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
            lay.check_views(fl, fl.members)
            lay.plan(fl)

    def _install_state(self, fl: Flat, m: Member) -> None:
        opt: Any = self
        if m.active and len(opt.state.get(m.param, ())) == 0:
            opt.state[m.param] = lay.member_state(fl, m)

    def _activate_late(self, fl: Flat) -> None:
        """A tensor without a grad so far that has one now (autograd allocated it): bring it in."""
        late = [m for m in fl.inactive if m.param.grad is not None]
        if not late:
            return
        lay.sync_steps(fl)
        for m in late:
            m.grad_view.copy_(m.param.grad)
            m.param.grad, m.active = m.grad_view, True
            self._install_state(fl, m)
        lay.plan(fl)

    def _update(self, fl: Flat) -> None:
        """Each run's launch, with the arguments bitsandbytes' update_step passes for the state kind."""
        from bitsandbytes import functional as F

        opt: Any = self
        group = opt.param_groups[fl.gindex]
        config = opt.get_config(fl.gindex, fl.members[0].pindex, group)
        betas, q = config["betas"], fl.quant
        beta3, alpha = 0.0, 0.0  # the one-state update passes zeros
        if fl.state2 is not None:
            beta3, alpha = (betas[2] if len(betas) >= 3 else 0.0), config.get("alpha", 0.0)
        for run in fl.runs:
            run.step += 1
            g, p, s1, s2, a1, a2 = run.views
            if q is None:
                F.optimizer_update_32bit(
                    opt.optimizer_name, g, p, s1, betas[0], config["eps"], run.step, config["lr"], s2, betas[1],
                    beta3, alpha, config["weight_decay"], 1.0, None, max_unorm=config["max_unorm"],
                    skip_zeros=config["skip_zeros"],
                )  # fmt: skip
                continue
            F.optimizer_update_8bit_blockwise(
                opt.optimizer_name, g, p, s1, s2, betas[0], betas[1], beta3, alpha, config["eps"], run.step,
                config["lr"], q.qmap1, q.qmap2, a1, a2, config["weight_decay"], gnorm_scale=1.0,
                skip_zeros=config["skip_zeros"],
            )  # fmt: skip
        lay.reset_padding(fl)

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
            lay.sync_steps(fl)
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
                    lay.take_loaded(fl, m, loaded)
                    opt.state[m.param] = lay.member_state(fl, m)
                else:  # no state saved for it: fresh, as bitsandbytes' init_state would make it
                    m.step = 0
                    lay.clear(fl, m)
                    opt.state.pop(m.param, None)
                    self._install_state(fl, m)
            if not self._first_step:
                lay.check_views(fl, fl.members)
                lay.plan(fl)


def _marker(m: Member) -> Any:
    def hook(_p: torch.Tensor) -> None:
        m.used = True

    return hook


def _check_block_size(opt: Any, m: Member) -> None:
    """bitsandbytes sizes each tensor's absmax by its block size: ours must be the same."""
    probe = torch.zeros(m.numel, device=m.param.device)
    opt.init_state(opt.param_groups[m.gindex], probe, m.gindex, m.pindex)
    blocks = opt.state.pop(probe)["absmax1"].numel()
    if blocks != m.blocks:
        raise RuntimeError(
            f"flat 8-bit optimizer: bitsandbytes uses {blocks} absmax blocks for {m.numel} elements, "
            f"not {m.blocks} (block size {lay.BLOCK}); this bitsandbytes is not supported (FLAT_8BIT=off)"
        )


def flatten_optimizer(optimizer: torch.optim.Optimizer, host_module_dropout: bool = False) -> str:
    """Lay out a `flat_class` optimizer's buffers if it can take the flat update; returns the log line."""
    if not isinstance(optimizer, FlatBlockwise8bit):
        return ""  # not bitsandbytes: nothing to say
    why = optimizer.flat_blockers()
    if why is None and host_module_dropout:
        why = "module dropout decided on the host can leave a tensor without a grad for one step"
    if why is not None:
        return f"flat 8-bit update: off ({why}); bitsandbytes' per-tensor loop"
    got = optimizer.attach_flat()
    if not got.tensors8 + got.tensors32:
        return (
            "flat 8-bit update: off (no group has two tensors with one kind of state); "
            f"{got.rest} tensor(s) on bitsandbytes' per-tensor loop"
        )
    return (
        f"flat 8-bit update: {got.tensors8} tensors in {got.buffers8} 8-bit flat buffer(s), {got.tensors32} in "
        f"{got.buffers32} 32-bit flat buffer(s), {got.buffers8 + got.buffers32} launch(es) per step; "
        f"{got.rest} tensor(s) on bitsandbytes' per-tensor loop ({ENV}=off turns it off)"
    )
