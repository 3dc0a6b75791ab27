"""Dropout of an adapter branch, deterministic per (seed, step, module): the same on every rank and in
gradient-checkpoint recomputation.

Three kinds: neuron dropout (elements of the branch output), rank dropout (its output channels, keep/(1−p))
and module dropout (the whole branch). Rank and module decisions are drawn on the CPU; the network copies
them into one device buffer per step (`AdapterNetwork.prepare_step_masks`), so a CUDA graph can replay them.
"""

from __future__ import annotations

import torch

_MASK64 = 0xFFFFFFFFFFFFFFFF
_GOLDEN = 0x9E3779B97F4A7C15


class DropoutClock:
    """Shared by all adapters of a network: (seed, step) seeds every dropout decision."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self.step = 0


def mix_seed(*parts: int) -> int:
    """Deterministic 63-bit mix of integers (a SplitMix-style hash), identical on every rank."""
    h = _GOLDEN
    for p in parts:
        h ^= (int(p) + _GOLDEN + ((h << 6) & _MASK64) + (h >> 2)) & _MASK64
        h = (h * 0xBF58476D1CE4E5B9) & _MASK64
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class DropoutMixin:
    """The dropout state and draws of an adapter; mixed into AdapterModule."""

    dropout: float | None
    rank_dropout: float | None
    module_dropout: float | None
    out_dim: int
    is_conv: bool
    index: int
    clock: DropoutClock | None
    training: bool

    def _init_dropout(
        self, dropout: float | None, rank_dropout: float | None, module_dropout: float | None
    ) -> None:
        self.dropout = dropout or None
        self.rank_dropout = rank_dropout or None
        self.module_dropout = module_dropout or None
        self.index = 0  # position in the network, seeds its dropout draws
        self.clock = None
        self._device_gens: dict[str, torch.Generator] = {}
        self.rank_scale: torch.Tensor | None = None  # view into the network's per-step mask buffer
        self.rank_scale_step = -1
        # module dropout as a 0/1 factor read from the per-step buffer (CUDA graphs, torch.compile) instead of a
        # Python branch; set by the network's use_device_module_dropout()
        self.module_dropout_on_device = False
        self.module_keep: torch.Tensor | None = None
        self.module_keep_step = -1

    def _device_gen(self, device: torch.device) -> torch.Generator:
        key = str(device)
        g = self._device_gens.get(key)
        if g is None:
            g = torch.Generator(device=device)
            self._device_gens[key] = g
        return g

    def _seed(self, kind: int) -> int:
        clock = self.clock
        seed, step = (clock.seed, clock.step) if clock is not None else (0, 0)
        return mix_seed(seed, step, self.index, kind)

    def rank_keep_scale_cpu(self) -> torch.Tensor:
        """keep/(1−p) over the O output channels for this step, drawn on the CPU."""
        p = float(self.rank_dropout or 0.0)
        g = torch.Generator().manual_seed(self._seed(1))
        return (torch.rand(self.out_dim, generator=g) >= p).float() / (1.0 - p)

    def module_keep_cpu(self) -> float:
        """1.0 if this module is kept this step, 0.0 if module dropout drops it; decided on the CPU."""
        g = torch.Generator().manual_seed(self._seed(0))
        return 0.0 if float(torch.rand(1, generator=g)[0]) < float(self.module_dropout or 0.0) else 1.0

    def _module_keep(self, device: torch.device) -> torch.Tensor:
        clock = self.clock
        if self.module_keep is not None and clock is not None and self.module_keep_step == clock.step:
            return self.module_keep
        return torch.tensor([self.module_keep_cpu()], device=device)

    def _rank_keep_scale(self, device: torch.device) -> torch.Tensor:
        # The network fills `rank_scale` once per step (one copy for all modules, at a fixed address so a
        # CUDA graph can replay it); a module used outside that (tests, a bare forward) draws its own.
        clock = self.clock
        if self.rank_scale is not None and clock is not None and self.rank_scale_step == clock.step:
            return self.rank_scale
        return self.rank_keep_scale_cpu().to(device, non_blocking=True)

    def host_dropped(self) -> bool:
        """Module dropout decided on the host dropped this branch for this step."""
        return (
            self.training
            and bool(self.module_dropout)
            and not self.module_dropout_on_device
            and self.module_keep_cpu() == 0.0
        )

    def apply_dropout(self, out: torch.Tensor) -> torch.Tensor:
        """drop(branch output): module keep read on the device, rank mask, neuron dropout (training only)."""
        training = self.training
        if training and self.module_dropout and self.module_dropout_on_device:
            out = out * self._module_keep(out.device).to(out.dtype).view([1] * out.dim())
        if training and (self.rank_dropout or self.dropout):
            ch_dim = 1 if self.is_conv else out.dim() - 1
            if self.rank_dropout:
                shape = [1] * out.dim()
                shape[ch_dim] = self.out_dim
                out = out * self._rank_keep_scale(out.device).to(out.dtype).view(shape)
            if self.dropout:
                p = self.dropout
                g = self._device_gen(out.device)
                g.manual_seed(self._seed(2))
                keep = torch.rand(out.shape, generator=g, device=out.device) >= p
                out = out * keep.to(out.dtype) / (1.0 - p)
        return out

    def masked_right(self, right: torch.Tensor, step_masked: bool) -> torch.Tensor:
        """The per-step masks applied to the right factor of a fused product (rows = output channels)."""
        if not step_masked:
            return right
        if self.rank_dropout:  # an output-channel mask = a row mask on right
            keep = self._rank_keep_scale(right.device).to(right.dtype)
            right = right * keep.view(-1, *([1] * (right.dim() - 1)))
        if self.module_dropout and self.module_dropout_on_device:  # ×0 drops the branch
            right = right * self._module_keep(right.device).to(right.dtype).view([1] * right.dim())
        return right
