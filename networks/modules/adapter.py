"""The per-layer adapter base class shared by LoRA, LoHa and LoKr.

An adapter owns only its factors (named exactly like the file keys), a 0-d fp32 `alpha` buffer and,
with `use_scalar`, a trainable σ. The base layer is referenced, never registered as a child, so the
network's `state_dict()` holds adapter tensors only.

Forward: y = base(x) + m·s·drop(ΔW_raw·x); the branch is cast to y's dtype and added once. The class is
assembled from parts, each in its own module: α and σ (`alpha`), file tensors (`file_tensors`), dropout
(`dropout`), the forward paths (`forward`, decided in `networks.paths`) and layer patching (`patching`).
Merging lives in `networks.merge`. An algorithm class adds its factors and ΔW maths.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from networks.functional import apply_weight
from networks.modules.alpha import AlphaMixin
from networks.modules.dropout import DropoutClock, DropoutMixin, mix_seed
from networks.modules.file_tensors import FileTensorsMixin
from networks.modules.forward import ForwardMixin
from networks.modules.patching import attach_adapter, detach_adapter, is_patched
from networks.network_args import NetworkArgs
from networks.paths import DEFAULT_POLICY, PathPolicy

SUPPORTED_LEAVES = (nn.Linear, nn.Conv2d)

__all__ = [
    "SUPPORTED_LEAVES",
    "AdapterModule",
    "DropoutClock",
    "attach_adapter",
    "detach_adapter",
    "dropout_kwargs",
    "drawn_on_cpu",
    "is_patched",
    "kaiming_",
    "mix_seed",
]


class AdapterModule(ForwardMixin, DropoutMixin, FileTensorsMixin, AlphaMixin, nn.Module):
    """Base of LoRAModule / LoHaModule / LoKrModule. Subclasses implement the factor layout."""

    algo: ClassVar[str] = ""
    # parameter names that go into the LoRA+ "plus" group (the factor next to the output)
    plus_param_names: ClassVar[tuple[str, ...]] = ()
    # the `merged` path of this class needs a frozen plain Linear base (see networks.paths)
    merged_needs_frozen_linear: ClassVar[bool] = False

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(org_module, SUPPORTED_LEAVES):
            raise TypeError(
                f"{lora_name}: cannot adapt a {type(org_module).__name__}; expected Linear or Conv2d"
            )
        self.lora_name = lora_name
        self._org = [org_module]  # a list so the base layer is not registered as a child
        self.is_conv = isinstance(org_module, nn.Conv2d)
        w_shape = tuple(org_module.weight.shape)
        self.out_dim, self.in_dim = w_shape[0], w_shape[1]
        self.kernel_size: tuple[int, int] = tuple(w_shape[2:]) if self.is_conv else (1, 1)  # type: ignore[assignment]
        self.is_kxk = self.kernel_size != (1, 1)
        self.multiplier = float(multiplier)
        self.enabled = True
        self.te_index: int | None = None  # None for the U-Net/DiT side
        self.original_name = ""
        self.merged_forward = False  # opt-in (network arg): y = x·(W + ΔW)ᵀ on rebuilt layers
        self._backup: torch.Tensor | None = None
        self._init_alpha()
        self._init_dropout(dropout, rank_dropout, module_dropout)
        # which path runs (networks.paths): the network's policy, or a per-module force of the factored form
        self.path_policy: PathPolicy = DEFAULT_POLICY
        self.use_factored: bool | None = None
        self._path_cache: dict[int, bool] = {}

    # ------------------------------------------------------------------ set-up helpers
    @property
    def org_module(self) -> nn.Module:
        return self._org[0]

    def _org_device(self) -> torch.device:
        return self.org_module.weight.device

    def _init_device(self) -> torch.device:
        """Where the constructor creates and draws the parameters (see `drawn_on_cpu`)."""
        return torch.device("cpu") if _DRAW_ON_CPU else self._org_device()

    def _new_param(self, *shape: int) -> nn.Parameter:
        return nn.Parameter(torch.empty(*shape, dtype=torch.float32, device=self._init_device()))

    @property
    def layer_shape(self) -> tuple[int, ...]:
        return tuple(self.org_module.weight.shape)

    def set_path_policy(self, policy: PathPolicy) -> None:
        """Use `policy` from now on (earlier per-shape choices are forgotten)."""
        self.path_policy = policy
        self._path_cache.clear()

    # ------------------------------------------------------------------ maths (subclasses)
    def delta_weight(self, multiplier: float = 1.0) -> torch.Tensor:
        """ΔW incl. s, σ and `multiplier`, shaped exactly like the layer weight."""
        return self.delta_weight_scaled(self.total_scale(multiplier)).reshape(self.layer_shape)

    def branch(self, x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
        """ΔW_raw·x·scale without dropout; default builds ΔW and applies it with the layer's op."""
        dw = self.delta_weight_scaled(scale)
        if dw.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            dw = dw.to(x.dtype)
        return apply_weight(x, dw, self.org_module)

    def delta_weight_scaled(self, scale: float | torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def linear_factors(
        self, x: torch.Tensor, scale: float | torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(down, right) with ΔW_raw·x·scale = (x·downᵀ)·rightᵀ on a Linear layer (down None: x·rightᵀ).
        Default: the rebuild, (None, ΔW)."""
        return None, self.delta_weight_scaled(scale).reshape(self.out_dim, -1)

    def has_factored_form(self) -> bool:
        """A path that never builds ΔW exists for this layer (LoKr bypass, LoHa Khatri–Rao)."""
        return False

    def choose_factored(self, tokens: int, policy: PathPolicy) -> bool:
        """Whether `policy` picks the factored form for an input of `tokens` rows."""
        return False

    def norm_for_max(self) -> torch.Tensor:
        """‖ΔW‖_F with s and σ, without m (what --scale_weight_norms clamps)."""
        return self.delta_weight_scaled(self.total_scale(1.0)).detach().float().norm()

    def scale_for_max(self, ratio: torch.Tensor) -> None:
        """Scale the factors so that ΔW is multiplied by `ratio` (σ alone when present)."""
        if self.scalar is not None:
            self.scalar.data.mul_(ratio)
            return
        root = ratio.sqrt()
        for name in self.max_norm_param_names():
            p = getattr(self, name) if "." not in name else self.get_parameter(name)
            p.data.mul_(root.to(p.dtype))

    def max_norm_param_names(self) -> tuple[str, ...]:
        raise NotImplementedError

    # ------------------------------------------------------------------ reporting
    def describe(self) -> dict[str, Any]:
        """A row of the verbose table."""
        return {
            "name": self.lora_name,
            "shape": "x".join(str(s) for s in self.layer_shape),
            "layout": self.layout(),
            "rank": self.rank,
            "alpha": self.alpha_value,
            "scale": self.scale,
            "params": sum(p.numel() for n, p in self.named_parameters() if n != "scalar"),
        }

    def layout(self) -> str:
        return self.algo

    @classmethod
    def log_created(cls, modules: list[AdapterModule], args: NetworkArgs) -> None:
        """Hook: a note about freshly created modules of this algorithm (LoKr reports its full-W2 layers)."""


_DRAW_ON_CPU = False


@contextlib.contextmanager
def drawn_on_cpu() -> Iterator[None]:
    """Adapters constructed inside create and draw their parameters on the CPU, whatever device the base
    layer is on (the caller moves them there): fresh random factors are then the same values on every
    device, from the CPU generator, as when the base model is still on the CPU."""
    global _DRAW_ON_CPU
    before, _DRAW_ON_CPU = _DRAW_ON_CPU, True
    try:
        yield
    finally:
        _DRAW_ON_CPU = before


def kaiming_(t: torch.Tensor) -> torch.Tensor:
    """kaiming-uniform(a=√5), i.e. U(±1/√fan_in) as nn.Linear's default init."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def dropout_kwargs(args: NetworkArgs) -> dict[str, float | None]:
    return {"dropout": args.dropout, "rank_dropout": args.rank_dropout, "module_dropout": args.module_dropout}
