"""Merging: W ← W + m·ΔW, computed in fp32 and cast back to W's dtype once.

Two callers: a network merging its own modules into the layers they patch (`merge_to`, `pre_calculation`),
and sd-scripts' weight loaders, which hand one layer's weight and a file's tensors to the entry module's
`merge_weights_to_tensor`. Both build ΔW with the same module classes the trainer uses.
"""

from __future__ import annotations

import torch
from torch import nn

from networks import fp8
from networks.modules.adapter import AdapterModule
from networks.network_args import NetworkArgs
from networks.network_io import detect_algorithm
from networks.registry import module_class_for


@torch.no_grad()
def delta_weight_fp32(module: AdapterModule, multiplier: float, device: torch.device) -> torch.Tensor:
    """m·s·ΔW of `module` in fp32 on `device`, its parameters left as they were."""
    params = list(module.named_parameters())
    saved = {n: p.data for n, p in params}
    try:
        for _n, p in params:
            p.data = p.data.to(device=device, dtype=torch.float32)
        return module.delta_weight_scaled(module.total_scale(multiplier)).float()
    finally:
        for n, p in params:
            p.data = saved[n]


def _merged(weight: torch.Tensor, delta: torch.Tensor, device: torch.device) -> torch.Tensor:
    """cast(W_fp32 + ΔW_fp32) back to W's dtype and device: one rounding."""
    merged = weight.detach().to(device, torch.float32) + delta.reshape(weight.shape)
    return merged.to(dtype=weight.dtype).to(weight.device)


@torch.no_grad()
def merge_module_into_base(
    module: AdapterModule, multiplier: float, device: torch.device | str | None = None
) -> None:
    """The patched layer's weight ← W + m·ΔW of `module` (maths on `device`, default the weight's)."""
    w = module.org_module.weight
    dev = torch.device(device) if device is not None else w.device
    if fp8.is_fp8(w):  # dequantized, merged, quantized again (a scaled layer gets fresh scales)
        merged = fp8.dequantized_weight(module.org_module, torch.float32).to(dev)
        fp8.store_weight(
            module.org_module, merged + delta_weight_fp32(module, multiplier, dev).reshape(w.shape)
        )
        return
    w.data.copy_(_merged(w, delta_weight_fp32(module, multiplier, dev), dev))


def _stand_in_layer(lora_name: str, weight: torch.Tensor) -> nn.Module:
    """A Linear/Conv2d on the meta device shaped like `weight`, for building a module around a bare tensor."""
    if weight.dim() == 4:
        leaf: nn.Module = nn.Conv2d(
            weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), bias=False, device="meta"
        )
    elif weight.dim() == 2:
        leaf = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    else:
        raise ValueError(f"{lora_name}: cannot merge into a weight of shape {tuple(weight.shape)}")
    leaf.weight = nn.Parameter(torch.empty_like(weight, device="meta"), requires_grad=False)
    return leaf


def merge_weights_to_tensor_for(
    algo: str,
    model_weight: torch.Tensor,
    lora_name: str,
    lora_sd: dict[str, torch.Tensor],
    lora_weight_keys: set[str],
    multiplier: float,
    calc_device: torch.device | str,
) -> torch.Tensor:
    """Merge the `algo` adapter named `lora_name` into `model_weight` (fp32 maths, one cast back).

    Returns the weight unchanged when `lora_sd` has no keys of this algorithm for that name; otherwise
    removes the consumed keys from `lora_weight_keys`.
    """
    prefix = lora_name + "."
    own = {k[len(prefix) :]: v for k, v in lora_sd.items() if k.startswith(prefix)}
    if not own:
        return model_weight
    try:
        found = detect_algorithm(lora_name, own)
    except KeyError:
        return model_weight
    if found != algo:
        return model_weight
    dev = torch.device(calc_device)
    leaf = _stand_in_layer(lora_name, model_weight)
    module = module_class_for(algo).from_tensors(lora_name, leaf, own, multiplier, NetworkArgs(algo=algo))
    module.to_empty(device=dev)
    module.load_file_tensors({k: v.to(dev, torch.float32) for k, v in own.items()})
    merged = _merged(model_weight, delta_weight_fp32(module, multiplier, dev), dev)
    for k in own:
        lora_weight_keys.discard(prefix + k)
    return merged
