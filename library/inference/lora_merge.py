"""Static merge of LoRA / LoHa / LoKr files into model weights (fp32 maths, one cast back).

The algorithm is decided per module from its keys (a file may mix them), so LyCORIS-style
files and our own load the same way. Used by `anima_minimal_inference.py`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from networks import fp8, network_io
from networks.merge import merge_weights_to_tensor_for

logger = logging.getLogger(__name__)


def group_by_module(sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """`name.suffix` keys grouped by module name (the text before the first dot); ValueError on a bare key."""
    for key in sd:
        if "." not in key:
            raise ValueError(f"LoRA key {key!r} has no '.<tensor>' suffix")
    return network_io.group_by_module(sd)


def detect_algorithm(name: str, tensors: dict[str, torch.Tensor]) -> str:
    """'lora' | 'loha' | 'lokr' from the keys of one module (the network base's rule); else ValueError."""
    try:
        return network_io.detect_algorithm(name, set(tensors))
    except KeyError as e:
        raise ValueError(str(e).strip("'\"")) from None


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
    weight_of: Callable[[str], float] | None = None,
) -> MergeReport:
    """Merge one file into Linear/Conv2d leaves of each (prefix, root) in place.

    A leaf at dotted path P of root is looked up as `prefix + "_" + P.replace(".", "_")`. `weight_of` gives a
    module's factor on `multiplier` (per-block strength, networks.block_weights).
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
                m = multiplier * (weight_of(name) if weight_of is not None else 1.0)
                fp8_layer = fp8.is_fp8_layer(mod)  # merged into fp8 × scale in fp32, then quantized again
                w = fp8.dequantized_weight(mod, torch.float32) if fp8_layer else mod.weight
                dev = calc_device or w.device
                new = merge_weights_to_tensor_for(algo, w, name, lora_sd, remaining, m, dev)
                if fp8_layer:
                    fp8.store_weight(mod, new)
                else:
                    mod.weight.copy_(new)
            report.by_algo[algo] = report.by_algo.get(algo, 0) + 1
    report.unused = sorted(remaining)
    return report


# `lora_te1_` alone is not SDXL: LyCORIS names Anima's single Qwen3 encoder `lora_te1_layers_…` when it
# is handed a list of text encoders. SDXL's TE1 is a CLIP `text_model`.
_SDXL_HINT = re.compile(
    r"^lora_(te1_text_model_|te2_|unet_(input_blocks|output_blocks|middle_block|down_blocks|up_blocks)_)"
)


def looks_like_sdxl(keys: Iterable[str]) -> bool:
    return any(_SDXL_HINT.match(k) for k in keys)
