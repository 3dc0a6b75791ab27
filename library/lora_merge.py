"""Static merge of LoRA / LoHa / LoKr files into model weights (fp32 maths, one cast back).

The algorithm is decided per module from its keys (a file may mix them), so LyCORIS-style
files and our own load the same way. Used by `anima_minimal_inference.py`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

logger = logging.getLogger(__name__)

_LORA = {"lora_down.weight", "lora_up.weight", "alpha"}
_LOHA = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}
_LOKR = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"}


def group_by_module(sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """`name.suffix` keys grouped by module name (the text before the first dot)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, val in sd.items():
        if "." not in key:
            raise ValueError(f"LoRA key {key!r} has no '.<tensor>' suffix")
        name, suffix = key.split(".", 1)
        out.setdefault(name, {})[suffix] = val
    return out


def detect_algorithm(name: str, tensors: dict[str, torch.Tensor]) -> str:
    """'lora' | 'loha' | 'lokr' from the keys of one module; anything else is an error."""
    keys = set(tensors)
    if {"lora_down.weight", "lora_up.weight"} <= keys:
        algo, allowed = "lora", _LORA
    elif "hada_w1_a" in keys:
        algo, allowed = "loha", _LOHA
    elif keys & {"lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a"}:
        algo, allowed = "lokr", _LOKR
    else:
        raise ValueError(f"module {name}: keys {sorted(keys)} are not LoRA, LoHa or LoKr")
    extra = keys - allowed
    if extra:
        raise ValueError(f"module {name}: unsupported keys {sorted(extra)} for {algo} (e.g. Tucker/DoRA)")
    return algo


def _alpha(tensors: dict[str, torch.Tensor], rank: int) -> float:
    a = tensors.get("alpha")
    if a is None:
        return float(rank)
    val = float(a.float().item())
    return float(rank) if val == 0.0 else val


def delta_weight(
    name: str, tensors: dict[str, torch.Tensor], shape: torch.Size, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """ΔW (scale included, multiplier excluded) in fp32, reshaped to `shape`."""
    t = {k: v.to(device=device, dtype=torch.float32) for k, v in tensors.items()}
    algo = detect_algorithm(name, t)
    if algo == "lora":
        down, up = t["lora_down.weight"].flatten(1), t["lora_up.weight"].flatten(1)
        r = down.shape[0]
        dw = (up @ down) * (_alpha(t, r) / r)
    elif algo == "loha":
        r = t["hada_w1_b"].shape[0]
        dw = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * (_alpha(t, r) / r)
    else:
        rank = None
        if "lokr_w1" in t:
            w1 = t["lokr_w1"]
        else:
            w1, rank = t["lokr_w1_a"] @ t["lokr_w1_b"], t["lokr_w1_b"].shape[0]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        else:
            w2b = t["lokr_w2_b"]
            w2, rank = t["lokr_w2_a"] @ w2b.flatten(1), w2b.shape[0]
        # both sides full: scale 1 (alpha is ignored there, as in every LoKr implementation)
        scale = 1.0 if rank is None else _alpha(t, rank) / rank
        w2 = w2.flatten(1)
        dw = torch.kron(w1, w2) * scale
    if dw.numel() != torch.Size(shape).numel():
        raise ValueError(
            f"module {name}: {algo} delta has {tuple(dw.shape)} elements, weight is {tuple(shape)}"
        )
    return dw.reshape(shape)


def merge_weights_to_tensor(
    model_weight: torch.Tensor,
    lora_name: str,
    lora_sd: dict[str, torch.Tensor],
    lora_weight_keys: set[str],
    multiplier: float,
    calc_device: torch.device | str | None = None,
) -> torch.Tensor:
    """W + m·ΔW for one module (fp32, cast back once); consumed keys leave `lora_weight_keys`.

    Returns the weight unchanged when the file has no keys for `lora_name`.
    """
    prefix = lora_name + "."
    mine = {k[len(prefix) :]: v for k, v in lora_sd.items() if k.startswith(prefix)}
    if not mine:
        return model_weight
    dev = calc_device or model_weight.device
    dw = delta_weight(lora_name, mine, model_weight.shape, dev)
    merged = model_weight.to(device=dev, dtype=torch.float32) + multiplier * dw
    for k in mine:
        lora_weight_keys.discard(prefix + k)
    return merged.to(device=model_weight.device, dtype=model_weight.dtype)


@dataclass
class MergeReport:
    """What one file did: modules merged per algorithm and keys left unused."""

    path: str
    multiplier: float
    by_algo: dict[str, int] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)

    @property
    def matched(self) -> int:
        return sum(self.by_algo.values())


def merge_into_modules(
    roots: Iterable[tuple[str, nn.Module]],
    lora_sd: dict[str, torch.Tensor],
    multiplier: float,
    path: str = "<memory>",
    calc_device: torch.device | str | None = None,
) -> MergeReport:
    """Merge one file into Linear/Conv2d leaves of each (prefix, root) in place.

    A leaf at dotted path P of root is looked up as `prefix + "_" + P.replace(".", "_")`.
    """
    report = MergeReport(path=str(path), multiplier=float(multiplier))
    groups = group_by_module(lora_sd)
    remaining = set(lora_sd)
    for prefix, root in roots:
        for mpath, mod in root.named_modules():
            if not isinstance(mod, (nn.Linear, nn.Conv2d)):
                continue
            name = prefix + "_" + mpath.replace(".", "_")
            if name not in groups:
                continue
            algo = detect_algorithm(name, groups[name])
            with torch.no_grad():
                new = merge_weights_to_tensor(mod.weight, name, lora_sd, remaining, multiplier, calc_device)
                mod.weight.copy_(new)
            report.by_algo[algo] = report.by_algo.get(algo, 0) + 1
    report.unused = sorted(remaining)
    return report


_SDXL_HINT = re.compile(
    r"^lora_(te1|te2|unet_(input_blocks|output_blocks|middle_block|down_blocks|up_blocks))_"
)


def looks_like_sdxl(keys: Iterable[str]) -> bool:
    return any(_SDXL_HINT.match(k) for k in keys)
