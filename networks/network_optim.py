"""Optimizer parameter groups of a network (docs/architecture.md): per side (TE1, TE2, U-Net), per
`network_reg_lrs` regex, LoRA+ "plus" groups, lr 0 → frozen and dropped."""

from __future__ import annotations

import logging
import re
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)


def _te_lrs(text_encoder_lr: Any, n_te: int, default_lr: float | None) -> list[float | None]:
    """TE i uses text_encoder_lr[i]; a short list reuses [0]; a float applies to all; None/[] → default."""
    if text_encoder_lr is None or (isinstance(text_encoder_lr, (list, tuple)) and len(text_encoder_lr) == 0):
        return [default_lr] * n_te
    if isinstance(text_encoder_lr, (list, tuple)):
        lrs = [float(v) if v is not None else None for v in text_encoder_lr]
        return [lrs[i] if i < len(lrs) else lrs[0] for i in range(n_te)]
    return [float(text_encoder_lr)] * n_te


class NetworkOptimMixin:
    """Mixed into AdapterNetwork; relies on `text_encoder_loras`, `unet_loras`, `args`, `parameters()`."""

    loraplus_lr_ratio: float | None
    loraplus_unet_lr_ratio: float | None
    loraplus_text_encoder_lr_ratio: float | None
    _trainable: list[nn.Parameter] | None

    def set_loraplus_lr_ratio(
        self,
        loraplus_lr_ratio: float | None,
        loraplus_unet_lr_ratio: float | None,
        loraplus_text_encoder_lr_ratio: float | None,
    ) -> None:
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.loraplus_unet_lr_ratio = loraplus_unet_lr_ratio
        self.loraplus_text_encoder_lr_ratio = loraplus_text_encoder_lr_ratio
        logger.info(
            "LoRA+ ratios: unet %s, text encoder %s",
            self._side_ratio(None),
            self._side_ratio(0),
        )

    def _side_ratio(self, te_index: int | None) -> float | None:
        side = self.loraplus_unet_lr_ratio if te_index is None else self.loraplus_text_encoder_lr_ratio
        return side or self.loraplus_lr_ratio or None

    def prepare_optimizer_params(
        self, text_encoder_lr: Any, unet_lr: float | None, default_lr: float | None = None
    ) -> tuple[list[dict[str, Any]], list[str]]:
        return self.prepare_optimizer_params_with_multiple_te_lrs(text_encoder_lr, unet_lr, default_lr)

    def prepare_optimizer_params_with_multiple_te_lrs(
        self, text_encoder_lr: Any, unet_lr: float | None, default_lr: float | None = None
    ) -> tuple[list[dict[str, Any]], list[str]]:
        reg_lrs = [(re.compile(p), lr) for p, lr in self.args.reg_lrs]  # type: ignore[attr-defined]
        te_indices = sorted({m.te_index for m in self.text_encoder_loras})  # type: ignore[attr-defined]
        n_te = (max(te_indices) + 1) if te_indices else 0
        te_lrs = _te_lrs(text_encoder_lr, n_te, default_lr)
        groups: list[dict[str, Any]] = []
        descs: list[str] = []
        grouped: list[nn.Parameter] = []
        sides: list[tuple[int | None, str, float | None, list[Any]]] = []
        for i in te_indices:
            mods = [m for m in self.text_encoder_loras if m.te_index == i]  # type: ignore[attr-defined]
            sides.append((i, f"textencoder {i + 1}", te_lrs[i], mods))
        if self.unet_loras:  # type: ignore[attr-defined]
            sides.append((None, "unet", unet_lr if unet_lr is not None else default_lr, self.unet_loras))  # type: ignore[attr-defined]
        for te_index, side_desc, side_lr, mods in sides:
            ratio = self._side_ratio(te_index)
            # bucket per reg_lr regex (first fullmatch wins) then the default bucket
            buckets: list[list[Any]] = [[] for _ in range(len(reg_lrs) + 1)]
            for m in mods:
                slot = next(
                    (k for k, (p, _) in enumerate(reg_lrs) if p.fullmatch(m.original_name)), len(reg_lrs)
                )
                buckets[slot].append(m)
            for slot, bucket in enumerate(buckets):
                if not bucket:
                    continue
                is_reg = slot < len(reg_lrs)
                lr = reg_lrs[slot][1] if is_reg else side_lr
                desc = f"{side_desc} reg_lr_{slot}" if is_reg else side_desc
                normal: list[nn.Parameter] = []
                plus: list[nn.Parameter] = []
                for m in bucket:
                    for name, p in m.named_parameters():
                        (plus if ratio and name in m.plus_param_names else normal).append(p)
                for params, suffix, group_lr in ((normal, "", lr), (plus, " plus", (lr or 0) * (ratio or 0))):
                    if not params:
                        continue
                    if not group_lr:
                        for p in params:
                            p.requires_grad_(False)
                        continue
                    for p in params:
                        p.requires_grad_(True)
                    groups.append({"params": params, "lr": float(group_lr)})
                    descs.append(desc + suffix)
                    grouped.extend(params)
        self._trainable = grouped
        return groups, descs

    def get_trainable_params(self) -> list[nn.Parameter]:
        if self._trainable is None:
            return [p for p in self.parameters()]  # type: ignore[attr-defined]
        return list(self._trainable)

    def prepare_grad_etc(self, text_encoder: Any = None, unet: Any = None) -> None:
        trainable = {id(p) for p in self.get_trainable_params()}
        for p in self.parameters():  # type: ignore[attr-defined]
            p.requires_grad_(id(p) in trainable)
