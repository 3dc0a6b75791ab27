"""The LoRA (LoCon for convs) adapter module; `networks.lora` is its sd-scripts entry module.

Keys per module: `lora_down.weight` (r, I) / (r, I, kh, kw), `lora_up.weight` (O, r) / (O, r, 1, 1), `alpha`.
Files with a LoCon-Tucker core (`lora_mid.weight` (r, r, kh, kw), down (r, I, 1, 1); LyCORIS `use_tucker`)
load and apply too; we never create that layout.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from networks import paths
from networks.functional import apply_weight, lora_delta_weight
from networks.functional.common import compute_dtype
from networks.functional.fused_linear import BaseWeight, adapter_linear, merged_lora_linear
from networks.modules.adapter import AdapterModule, dropout_kwargs, kaiming_
from networks.modules.alpha import alpha_or_rank, file_alpha
from networks.network_args import NetworkArgs


class LoRAModule(AdapterModule):
    algo = "lora"
    plus_param_names = ("lora_up.weight",)
    merged_needs_frozen_linear = True

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module,
        multiplier: float,
        rank: int,
        alpha: float | None,
        use_scalar: bool = False,
        tucker: bool = False,
        **dropouts: Any,
    ) -> None:
        super().__init__(lora_name, org_module, multiplier, **dropouts)
        if rank < 1:
            raise ValueError(f"{lora_name}: rank must be >= 1, got {rank}")
        dev = self._init_device()
        self.tucker = bool(tucker and self.is_kxk)
        if self.tucker:  # 1×1 down, k×k core with the layer's stride/padding, 1×1 up
            self.lora_down = nn.Conv2d(self.in_dim, rank, 1, bias=False, device=dev)
            self.lora_mid = nn.Conv2d(rank, rank, self.kernel_size, bias=False, device=dev)
            self.lora_up = nn.Conv2d(rank, self.out_dim, 1, bias=False, device=dev)
            kaiming_(self.lora_mid.weight)
        elif self.is_conv:
            self.lora_down = nn.Conv2d(self.in_dim, rank, self.kernel_size, bias=False, device=dev)
            self.lora_up = nn.Conv2d(rank, self.out_dim, 1, bias=False, device=dev)
        else:
            self.lora_down = nn.Linear(self.in_dim, rank, bias=False, device=dev)
            self.lora_up = nn.Linear(rank, self.out_dim, bias=False, device=dev)
        kaiming_(self.lora_down.weight)
        if use_scalar:
            self._enable_scalar()
            kaiming_(self.lora_up.weight)
        else:
            nn.init.zeros_(self.lora_up.weight)
        alpha = alpha_or_rank(alpha, rank)
        self._set_alpha(alpha, rank, alpha / rank)

    @classmethod
    def create(
        cls,
        lora_name: str,
        org: nn.Module,
        multiplier: float,
        rank: int,
        alpha: float | None,
        args: NetworkArgs,
    ) -> LoRAModule:
        return cls(
            lora_name, org, multiplier, rank, alpha, use_scalar=args.use_scalar, **dropout_kwargs(args)
        )

    @classmethod
    def from_tensors(
        cls,
        lora_name: str,
        org: nn.Module,
        tensors: dict[str, torch.Tensor],
        multiplier: float,
        args: NetworkArgs,
    ) -> LoRAModule:
        for k in tensors:
            if k not in ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha"):
                raise KeyError(
                    f"{lora_name}.{k}: unsupported LoRA key "
                    "(expected lora_down.weight, lora_up.weight, optional lora_mid.weight, alpha)"
                )
        down = tensors.get("lora_down.weight")
        if down is None or "lora_up.weight" not in tensors:
            raise KeyError(
                f"{lora_name}.lora_down.weight / lora_up.weight: both are needed for a LoRA module"
            )
        rank = int(down.shape[0])
        tucker = "lora_mid.weight" in tensors
        module = cls(
            lora_name,
            org,
            multiplier,
            rank,
            file_alpha(lora_name, tensors, rank),
            tucker=tucker,
            **dropout_kwargs(args),
        )
        if tucker and not module.tucker:
            raise ValueError(
                f"{lora_name}.lora_mid.weight: a Tucker core given for a layer without a k×k kernel"
            )
        for key in ("lora_down.weight", "lora_up.weight") + (("lora_mid.weight",) if tucker else ()):
            want = tuple(module.get_parameter(key).shape)
            if tuple(tensors[key].shape) != want:
                raise ValueError(
                    f"{lora_name}.{key}: shape {tuple(tensors[key].shape)} does not fit the layer (expected {want})"
                )
        return module

    def delta_weight_scaled(self, scale: float | torch.Tensor) -> torch.Tensor:
        mid = self.lora_mid.weight if self.tucker else None
        return lora_delta_weight(self.lora_down.weight, self.lora_up.weight, scale, mid)

    def _down_up(self, x: torch.Tensor, scale: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """down and s·up (the scale on the small matrix), in x's dtype unless autocast casts them."""
        down = self.lora_down.weight
        up = self.lora_up.weight * scale
        if down.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            down, up = down.to(x.dtype), up.to(x.dtype)
        return down, up

    def branch(self, x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
        # down then up: never builds ΔW
        down, up = self._down_up(x, scale)
        if self.tucker:  # a 1×1 channel mix commutes with the layer's padding, so it goes first
            mid = self.lora_mid.weight
            mid = mid.to(down.dtype) if mid.dtype != down.dtype else mid
            return F.conv2d(apply_weight(F.conv2d(x, down), mid, self.org_module), up)
        h = apply_weight(x, down, self.org_module)
        return F.conv2d(h, up) if self.is_conv else F.linear(h, up)

    def linear_factors(
        self, x: torch.Tensor, scale: float | torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        return self.lora_down.weight, self.lora_up.weight * scale

    def factor_node_output(
        self, x: torch.Tensor, weight: BaseWeight, bias: torch.Tensor | None, scale: float
    ) -> torch.Tensor:
        return adapter_linear(x, weight, bias, self.lora_down.weight, self.lora_up.weight, scale)

    def _merged(self, x: torch.Tensor) -> torch.Tensor:
        """`merged_forward` on a Linear layer: x·(W + s·up·down)ᵀ + b as one GEMM, the factors' grads from thin
        products (functional/fused_linear.py). Convs keep the unmerged path (networks.paths)."""
        base = self.org_module
        up = self.lora_up.weight * self.total_scale(self.multiplier)
        up = self.masked_right(up, paths.step_masked(self))
        dtype = compute_dtype(x)
        x = x if x.dtype == dtype else x.to(dtype)
        return merged_lora_linear(x, base.weight, base.bias, self.lora_down.weight, up)

    def max_norm_param_names(self) -> tuple[str, ...]:
        return ("lora_down.weight", "lora_up.weight")

    def scalar_bake_name(self) -> str:
        return "lora_up.weight"

    def layout(self) -> str:
        return "lora tucker" if self.tucker else ("lora k×k" if self.is_kxk else "lora")
