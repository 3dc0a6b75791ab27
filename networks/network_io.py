"""Network files: reading, atomic writing with sshs hashes, per-module algorithm detection, and the
module-level `merge_weights_to_tensor` used by weight loaders (spec networks.md §1.5, §1.7, §3.7, §4)."""

from __future__ import annotations

import hashlib
import logging
import os
from io import BytesIO
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save, save_file

from library.atomic_io import atomic_write, safetensors_size

logger = logging.getLogger(__name__)

LORA_KEYS = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")


def read_weights(
    file: str | os.PathLike[str], what: str = "network weights file"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, or of a `torch.save`d dict of tensors (weights only).

    ``what`` names the input in errors (e.g. the flag that gave the path)."""
    from library.tensor_files import read_tensors

    return read_tensors(file, what, expected="a .safetensors network file")


def group_by_module(weights_sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """`lora_name.key` → {lora_name: {key: tensor}} (lora_name = text before the first dot)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for full_key, t in weights_sd.items():
        name, dot, key = full_key.partition(".")
        if not dot:
            raise KeyError(f"{full_key}: not a '<lora_name>.<tensor>' key")
        groups.setdefault(name, {})[key] = t
    return groups


def detect_algorithm(lora_name: str, keys: set[str] | dict[str, Any]) -> str:
    """'lora' | 'loha' | 'lokr' from a module's key set (spec §4.3); anything else is an error."""
    keys = set(keys)
    if "hada_w1_a" in keys:
        return "loha"
    if keys & {"lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a"}:
        return "lokr"
    if "lora_down.weight" in keys or "lora_up.weight" in keys:
        return "lora"  # with or without a LoCon-Tucker lora_mid
    other = sorted(k for k in keys if k != "alpha")
    bad = other[0] if other else "alpha"
    raise KeyError(
        f"{lora_name}.{bad}: unsupported network key (supported: LoRA lora_down/lora_up, LoHa hada_*, LoKr lokr_*)"
    )


def sshs_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """sshs_model_hash / sshs_legacy_hash over an in-memory serialisation with only `ss_*` metadata."""
    ss_meta = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = save(tensors, ss_meta)
    buf = BytesIO(data)
    header_len = int.from_bytes(buf.read(8), "little")
    model_hash = hashlib.sha256(data[8 + header_len :]).hexdigest()
    legacy = hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy


def write_weights(
    file: str | os.PathLike[str], tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None
) -> None:
    """Atomic save: a temp file beside the target, then rename. safetensors gets sshs hashes."""
    path = Path(file)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    if path.suffix == ".safetensors":
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        meta["sshs_model_hash"], meta["sshs_legacy_hash"] = sshs_hashes(tensors, meta)
        atomic_write(path, lambda tmp: save_file(tensors, tmp, meta), size=safetensors_size(tensors, meta))
    else:
        atomic_write(path, lambda tmp: torch.save(tensors, tmp), size=safetensors_size(tensors))


class _DetachedLeaf(torch.nn.Module):
    """A stand-in layer holding only a weight, so adapter classes can rebuild ΔW for a bare tensor."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)


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
    from networks.network_base import module_class_for

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
    w32 = model_weight.detach().to(dev, torch.float32)
    if w32.dim() == 4:
        leaf: torch.nn.Module = torch.nn.Conv2d(
            w32.shape[1], w32.shape[0], tuple(w32.shape[2:]), bias=False, device="meta"
        )
    elif w32.dim() == 2:
        leaf = torch.nn.Linear(w32.shape[1], w32.shape[0], bias=False, device="meta")
    else:
        raise ValueError(f"{lora_name}: cannot merge into a weight of shape {tuple(w32.shape)}")
    leaf.weight = torch.nn.Parameter(torch.empty_like(w32, device="meta"), requires_grad=False)
    from networks.network_args import NetworkArgs

    cls = module_class_for(algo)
    module = cls.from_tensors(lora_name, leaf, own, multiplier, NetworkArgs(algo=algo))
    module.to_empty(device=dev)
    module.load_file_tensors({k: v.to(dev, torch.float32) for k, v in own.items()})
    with torch.no_grad():
        dw = module.delta_weight_scaled(module.total_scale(multiplier)).float().reshape(w32.shape)
        merged = (w32 + dw).to(model_weight.dtype).to(model_weight.device)
    for k in own:
        lora_weight_keys.discard(prefix + k)
    return merged
