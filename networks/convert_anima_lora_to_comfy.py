"""Convert Anima LoRA/LoHa/LoKr files between sd-scripts and ComfyUI key names.

sd-scripts:  lora_unet_blocks_0_self_attn_q_proj.lora_down.weight
             lora_te_layers_0_mlp_up_proj.hada_w1_a
ComfyUI:     diffusion_model.blocks.0.self_attn.q_proj.lora_A.weight
             text_encoders.qwen3_06b.transformer.model.layers.0.mlp.up_proj.hada_w1_a

sd-scripts module names replace every "." with "_", which cannot be undone by string
fix-ups (`adaln_modulation_self_attn`, `t_embedder`, `llm_adapter` all contain "_").
So the mapping is built from the real module trees: every Linear/Conv2d leaf path of the
DiT and of Qwen3 becomes a template (list indices become a number wildcard), and a key is
converted by matching its module name against those templates. Nothing is guessed.

Usage:
    python networks/convert_anima_lora_to_comfy.py --input a.safetensors --output b.safetensors
    python networks/convert_anima_lora_to_comfy.py a.safetensors b.safetensors [--reverse]
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_"
LYCORIS_TE_PREFIX = "lora_te1_"
COMFY_DIT_PREFIX = "diffusion_model."
COMFY_TE_PREFIX = "text_encoders.qwen3_06b.transformer.model."

# sd-scripts tensor-name suffix -> ComfyUI suffix (everything else passes through unchanged).
_FWD_SUFFIX = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}
_REV_SUFFIX = {v: k for k, v in _FWD_SUFFIX.items()}


class ConversionError(ValueError):
    """A key that cannot be mapped without guessing."""


def leaf_templates(root: nn.Module) -> list[str]:
    """Dotted paths of every Linear/Conv2d leaf, with ModuleList indices replaced by `{i}`.

    Sequential indices (`proj.1`, `mlp.0`) are part of the name and stay literal; only list
    indices vary with the block count, so one template covers 28, 20 or 36 blocks alike.
    """
    list_paths = {name for name, mod in root.named_modules() if isinstance(mod, nn.ModuleList)}
    out: set[str] = set()
    for name, mod in root.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv2d)) or not name:
            continue
        parts = name.split(".")
        for k in range(1, len(parts)):
            if ".".join(parts[:k]) in list_paths and parts[k].isdigit():
                parts[k] = "{i}"
        out.add(".".join(parts))
    return sorted(out)


class NameTable:
    """Bidirectional map between sd-scripts module names and dotted module paths."""

    def __init__(self, templates: list[str]) -> None:
        self.templates = list(templates)
        self._under: list[tuple[re.Pattern[str], str]] = []
        self._dotted: list[tuple[re.Pattern[str], str]] = []
        for t in self.templates:
            under = re.escape(t.replace(".", "_")).replace(re.escape("{i}"), r"(\d+)")
            dotted = re.escape(t).replace(re.escape("{i}"), r"(\d+)")
            self._under.append((re.compile(under), t))
            # a dotted module path followed by ".<tensor suffix>"
            self._dotted.append((re.compile(dotted + r"\.(.+)"), t))

    @staticmethod
    def _fill(template: str, groups: tuple[str, ...]) -> str:
        it = iter(groups)
        return re.sub(r"\{i\}", lambda _m: next(it), template)

    def to_path(self, lora_module: str) -> str | None:
        """`blocks_0_self_attn_q_proj` -> `blocks.0.self_attn.q_proj` (None if unknown)."""
        hits = {self._fill(t, m.groups()) for rx, t in self._under if (m := rx.fullmatch(lora_module))}
        if len(hits) > 1:
            raise ConversionError(f"module name {lora_module!r} is ambiguous: {sorted(hits)}")
        return hits.pop() if hits else None

    def split_path(self, dotted_key: str) -> tuple[str, str] | None:
        """`blocks.0.mlp.layer1.lora_A.weight` -> (`blocks.0.mlp.layer1`, `lora_A.weight`)."""
        hits = set()
        for rx, t in self._dotted:
            m = rx.fullmatch(dotted_key)
            if m:
                groups = m.groups()
                hits.add((self._fill(t, groups[:-1]), groups[-1]))
        # the longest module path wins only when it is the sole candidate of that length
        if not hits:
            return None
        best = max(len(p) for p, _ in hits)
        top = [h for h in hits if len(h[0]) == best]
        if len(top) > 1:
            raise ConversionError(f"key {dotted_key!r} is ambiguous: {sorted(top)}")
        return top[0]


@functools.lru_cache(maxsize=1)
def default_tables() -> tuple[NameTable, NameTable]:
    """Name tables built from the Anima DiT and Qwen3 module trees (tiny configs on meta)."""
    from transformers import Qwen3Model

    from library.anima.loading import tiny_qwen3_config
    from library.anima.model import Anima, tiny_anima_config

    # the tiny config has the real module tree; templates do not depend on the block count
    with torch.device("meta"):
        dit = Anima(tiny_anima_config())
    cfg = tiny_qwen3_config(vocab_size=64)
    with torch.device("meta"):
        te = Qwen3Model(cfg)
    return NameTable(leaf_templates(dit)), NameTable(leaf_templates(te))


def _split_key(key: str) -> tuple[str, str]:
    if "." not in key:
        raise ConversionError(f"key {key!r} has no tensor suffix (expected '<module>.<tensor>')")
    module, suffix = key.split(".", 1)
    return module, suffix


def bake_alpha(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold alpha/rank into `lora_up` and drop `alpha` (sd-scripts names, LoRA only).

    For loaders that ignore alpha (diffusers' Anima loader rejects keys without "lora"):
    the product up@down then already carries the scale, so the strength is unchanged.
    """
    out = dict(sd)
    for key in [k for k in sd if k.endswith(".alpha")]:
        module = key[: -len(".alpha")]
        down, up = sd.get(module + ".lora_down.weight"), sd.get(module + ".lora_up.weight")
        if down is None or up is None:
            raise ConversionError(f"--bake_alpha works on LoRA modules only; {module} is LoHa/LoKr")
        rank = down.shape[0]
        scale = float(sd[key].float()) / rank
        out[module + ".lora_up.weight"] = (up.float() * scale).to(up.dtype)
        del out[key]
    return out


def _rename_keys(
    sd: dict[str, torch.Tensor],
    routes: list[tuple[str, NameTable, str]],
    rename: Callable[[NameTable, str], str | None],
    prefixes: str,
    expected: str,
) -> dict:
    """Each key under a route's source prefix becomes target prefix + `rename(table, rest)`.

    `routes` are (source prefix, name table, target prefix), tried in order; a key under none of them is
    copied with a warning, and keys that `rename` cannot place (None) make one error listing them.
    """
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, val in sd.items():
        route = next((r for r in routes if key.startswith(r[0])), None)
        if route is None:
            logger.warning("key %s has no %s prefix; copied unchanged", key, prefixes)
            out[key] = val
            continue
        head, table, prefix = route
        tail = rename(table, key[len(head) :])
        if tail is None:
            unmapped.append(key)
            continue
        out[prefix + tail] = val
    if unmapped:
        raise ConversionError(
            f"{len(unmapped)} key(s) name no Anima module, e.g. {unmapped[:3]}; expected {expected}"
        )
    return out


def _to_comfy_tail(table: NameTable, rest: str) -> str | None:
    module, suffix = _split_key(rest)
    path = table.to_path(module)
    return None if path is None else path + "." + _FWD_SUFFIX.get(suffix, suffix)


def _from_comfy_tail(table: NameTable, rest: str) -> str | None:
    split = table.split_path(rest)
    if split is None:
        return None
    path, suffix = split
    return path.replace(".", "_") + "." + _REV_SUFFIX.get(suffix, suffix)


def to_comfy(sd: dict[str, torch.Tensor], tables: tuple[NameTable, NameTable] | None = None) -> dict:
    """sd-scripts keys -> ComfyUI keys. Unknown prefixes pass through with a warning."""
    dit_t, te_t = tables or default_tables()
    routes = [
        (UNET_PREFIX, dit_t, COMFY_DIT_PREFIX),
        (TE_PREFIX, te_t, COMFY_TE_PREFIX),
        (LYCORIS_TE_PREFIX, te_t, COMFY_TE_PREFIX),  # LyCORIS indexes Anima's one Qwen3 encoder as te1
    ]
    return _rename_keys(
        sd,
        routes,
        _to_comfy_tail,
        "lora_unet_/lora_te_",
        "sd-scripts names such as lora_unet_blocks_0_self_attn_q_proj.lora_down.weight",
    )


def from_comfy(sd: dict[str, torch.Tensor], tables: tuple[NameTable, NameTable] | None = None) -> dict:
    """ComfyUI keys -> sd-scripts keys. Unknown prefixes pass through with a warning."""
    dit_t, te_t = tables or default_tables()
    routes = [(COMFY_DIT_PREFIX, dit_t, UNET_PREFIX), (COMFY_TE_PREFIX, te_t, TE_PREFIX)]
    return _rename_keys(
        sd,
        routes,
        _from_comfy_tail,
        "diffusion_model./text_encoders.qwen3_06b",
        "ComfyUI names such as diffusion_model.blocks.0.self_attn.q_proj.lora_A.weight",
    )


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from networks.tensor_files import read_tensors

    path = Path(path)
    if not path.is_file() and not path.is_dir():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    return read_tensors(path, "--input", allow_torch=False, expected="a LoRA .safetensors file")


def write_lora_file(path: str | os.PathLike, sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Atomic save (temp file + rename) with the sshs hashes recomputed for the new keys."""
    # imported here: run as a script, the project root joins sys.path only in __main__
    from networks.atomic_io import save_safetensors_atomic
    from networks.network_io import sshs_hashes

    path = Path(path)
    meta = dict(metadata)
    sd = {k: v.contiguous() for k, v in sd.items()}
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = sshs_hashes(sd, meta)
    save_safetensors_atomic(sd, path, meta)


def convert_file(
    src: str | os.PathLike, dst: str | os.PathLike, reverse: bool = False, bake: bool = False
) -> int:
    """Convert one file; returns the number of tensors written."""
    if Path(dst).resolve() == Path(src).resolve() or (
        Path(dst).exists() and Path(src).exists() and os.path.samefile(src, dst)
    ):
        raise ValueError(
            f"--output {dst}: is the --input file; expected another path (the input is never overwritten)"
        )
    sd, meta = read_lora_file(src)
    if reverse and bake:
        raise ValueError("--bake_alpha applies to the sd-scripts -> ComfyUI direction only")
    out = from_comfy(sd) if reverse else to_comfy(bake_alpha(sd) if bake else sd)
    write_lora_file(dst, out, meta)
    return len(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src", nargs="?", help="input .safetensors (same as --input)")
    p.add_argument("dst", nargs="?", help="output .safetensors (same as --output)")
    p.add_argument("--input", help="input .safetensors")
    p.add_argument("--output", help="output .safetensors")
    p.add_argument("--reverse", action="store_true", help="ComfyUI -> sd-scripts instead")
    p.add_argument(
        "--bake_alpha",
        action="store_true",
        help="LoRA only: fold alpha/rank into lora_B and drop alpha (for diffusers, which ignores alpha)",
    )
    a = p.parse_args(argv)
    src, dst = a.input or a.src, a.output or a.dst
    if not src or not dst:
        p.error("give the input and output files (--input/--output or two positional paths)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    n = convert_file(src, dst, reverse=a.reverse, bake=a.bake_alpha)
    direction = "ComfyUI -> sd-scripts" if a.reverse else "sd-scripts -> ComfyUI"
    print(f"converted {n} tensors ({direction}): {dst}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from library.io.errors import run_cli

    run_cli(main)  # ConversionError is a ValueError: one line, exit 1
