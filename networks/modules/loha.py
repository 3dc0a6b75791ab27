"""The LoHa adapter module; `networks.loha` is its sd-scripts entry module (docs/architecture.md, LoHa).

ΔW = s·(w1_a·w1_b) ⊙ (w2_a·w2_b), or the Tucker form for k×k convs with `use_tucker`; the maths and its
custom autograd live in `networks.functional.loha`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from networks import paths
from networks.functional import loha_delta_weight, loha_khatri_rao_conv, loha_khatri_rao_linear
from networks.functional.fused_linear import BaseWeight, rebuild_linear
from networks.functional.loha import LOHA_RULE
from networks.modules.adapter import AdapterModule, dropout_kwargs
from networks.modules.alpha import alpha_or_rank, file_alpha
from networks.network_args import NetworkArgs

LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


class LoHaModule(AdapterModule):
    algo = "loha"
    plus_param_names = ("hada_w2_a",)

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module,
        multiplier: float,
        rank: int,
        alpha: float | None,
        use_tucker: bool = False,
        use_scalar: bool = False,
        **dropouts: Any,
    ) -> None:
        super().__init__(lora_name, org_module, multiplier, **dropouts)
        if rank < 1:
            raise ValueError(f"{lora_name}: rank must be >= 1, got {rank}")
        self.tucker = bool(use_tucker and self.is_kxk)
        o, i = self.out_dim, self.in_dim
        k = math.prod(self.kernel_size)
        if self.tucker:
            kh, kw = self.kernel_size
            self.hada_w1_a = self._new_param(rank, o)
            self.hada_w1_b = self._new_param(rank, i)
            self.hada_w2_a = self._new_param(rank, o)
            self.hada_w2_b = self._new_param(rank, i)
            self.hada_t1 = self._new_param(rank, rank, kh, kw)
            self.hada_t2 = self._new_param(rank, rank, kh, kw)
        else:
            self.hada_w1_a = self._new_param(o, rank)
            self.hada_w1_b = self._new_param(rank, i * k)
            self.hada_w2_a = self._new_param(o, rank)
            self.hada_w2_b = self._new_param(rank, i * k)
        # the second half starts at zero, so ΔW does (docs/architecture.md, LoHa)
        with torch.no_grad():
            nn.init.normal_(self.hada_w1_a, std=0.1)
            nn.init.normal_(self.hada_w1_b, std=1.0)
            nn.init.normal_(self.hada_w2_b, std=1.0)
            if use_scalar:
                self._enable_scalar()
                nn.init.normal_(self.hada_w2_a, std=0.1)
            else:
                nn.init.zeros_(self.hada_w2_a)
            if self.tucker:
                nn.init.normal_(self.hada_t1, std=0.1)
                nn.init.normal_(self.hada_t2, std=0.1)
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
    ) -> LoHaModule:
        return cls(
            lora_name,
            org,
            multiplier,
            rank,
            alpha,
            use_tucker=args.use_tucker,
            use_scalar=args.use_scalar,
            **dropout_kwargs(args),
        )

    @classmethod
    def from_tensors(
        cls,
        lora_name: str,
        org: nn.Module,
        tensors: dict[str, torch.Tensor],
        multiplier: float,
        args: NetworkArgs,
    ) -> LoHaModule:
        for k in tensors:
            if k not in LOHA_KEYS and k != "alpha":
                raise KeyError(
                    f"{lora_name}.{k}: unsupported LoHa key (expected {', '.join(LOHA_KEYS)}, alpha)"
                )
        for k in LOHA_KEYS[:4]:
            if k not in tensors:
                raise KeyError(f"{lora_name}.{k}: missing from the weights (needed for a LoHa module)")
        tucker = "hada_t1" in tensors or "hada_t2" in tensors
        rank = int(tensors["hada_w1_b"].shape[0])
        module = cls(
            lora_name,
            org,
            multiplier,
            rank,
            file_alpha(lora_name, tensors, rank),
            use_tucker=tucker,
            **dropout_kwargs(args),
        )
        if tucker and not module.tucker:
            raise ValueError(f"{lora_name}.hada_t1: Tucker factors given for a layer without a k×k kernel")
        for name, p in module.named_parameters():
            if name in tensors and tuple(tensors[name].shape) != tuple(p.shape):
                raise ValueError(
                    f"{lora_name}.{name}: shape {tuple(tensors[name].shape)} does not fit the layer "
                    f"{tuple(module.layer_shape)} (expected {tuple(p.shape)})"
                )
        return module

    def delta_weight_scaled(self, scale: float | torch.Tensor) -> torch.Tensor:
        if self.tucker:
            return loha_delta_weight(
                self.hada_w1_a,
                self.hada_w1_b,
                self.hada_w2_a,
                self.hada_w2_b,
                scale,
                self.hada_t1,
                self.hada_t2,
            )
        shape = self.layer_shape if self.is_kxk else None
        return loha_delta_weight(
            self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, scale, shape=shape
        )

    def has_factored_form(self) -> bool:
        return not self.tucker and not (self.is_conv and self.org_module.groups != 1)

    def choose_factored(self, tokens: int, policy: paths.PathPolicy) -> bool:
        k = math.prod(self.kernel_size)
        path = paths.select_loha_path(policy, tokens, self.out_dim, self.in_dim * k, self.rank, self.is_conv)
        return path == "khatri_rao"

    def branch(self, x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
        if not paths.factored(self, x):
            return super().branch(x, scale)
        w = (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b)
        if w[0].dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            w = tuple(t.to(x.dtype) for t in w)
        if self.is_conv:
            return loha_khatri_rao_conv(x, *w, scale, self.org_module)
        return loha_khatri_rao_linear(x, *w, scale)

    def factor_node_output(
        self, x: torch.Tensor, weight: BaseWeight, bias: torch.Tensor | None, scale: float
    ) -> torch.Tensor:
        factors = (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b)
        return rebuild_linear(x, weight, bias, LOHA_RULE, scale, factors)

    def max_norm_param_names(self) -> tuple[str, ...]:
        return ("hada_w1_a", "hada_w2_a")

    def scalar_bake_name(self) -> str:
        return "hada_w1_a"

    def layout(self) -> str:
        return "loha tucker" if self.tucker else ("loha flat" if self.is_kxk else "loha")
