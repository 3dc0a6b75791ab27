"""Network files: reading, atomic writing with sshs hashes, and per-module algorithm detection from keys.

Pure I/O: nothing here builds modules or merges weights (that is `networks.merge`). The key formats are
described in docs/architecture.md."""

from __future__ import annotations

import hashlib
import logging
import os
from io import BytesIO
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save, save_file

from networks.atomic_io import atomic_write, safetensors_size

logger = logging.getLogger(__name__)

LORA_KEYS = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")


def read_weights(
    file: str | os.PathLike[str], what: str = "network weights file"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, or of a `torch.save`d dict of tensors (weights only).

    ``what`` names the input in errors (e.g. the flag that gave the path)."""
    from networks.tensor_files import read_tensors

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
    """'lora' | 'loha' | 'lokr' from a module's key set; anything else is an error."""
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
