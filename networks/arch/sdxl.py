"""SDXL: targets and the diffusers → SGM (original Stability) module-path map.

File keys always use the SGM paths (`input_blocks.4.1.transformer_blocks.0.attn1.to_q`), which is what
sd-scripts, ComfyUI and users' regexes expect, whatever model class holds the weights.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from .base import Architecture, PathMapper, identity_path

_RESNET_RENAME = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_TOP_RENAME = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _is_sgm_layout(unet: nn.Module) -> bool:
    return all(hasattr(unet, a) for a in ("input_blocks", "middle_block", "output_blocks"))


def is_sdxl_unet(unet: nn.Module) -> bool:
    name = type(unet).__name__
    if name == "SdxlUNet2DConditionModel" or (_is_sgm_layout(unet) and hasattr(unet, "label_emb")):
        return True
    if name == "UNet2DConditionModel":
        cfg = getattr(unet, "config", None)
        return cfg is not None and getattr(cfg, "addition_embed_type", None) == "text_time"
    return False


def is_sdxl_text_encoders(tes: Sequence[nn.Module]) -> bool:
    return all(type(t).__name__.startswith("CLIPTextModel") for t in tes)


def _map_resnet_tail(tail: str) -> str:
    head, _, rest = tail.partition(".")
    return _RESNET_RENAME.get(head, head) + ("." + rest if rest else "")


def make_diffusers_to_sgm(layers_per_block: int, up_blocks_with_attention: set[int]) -> PathMapper:
    """Return a function mapping a diffusers UNet2DConditionModel module path to its SGM path."""
    n_down = layers_per_block + 1  # input_blocks per level: resnets + downsampler
    n_up = layers_per_block + 1  # output_blocks per level: one more resnet than the down path

    def mapper(path: str) -> str:
        for old, new in _TOP_RENAME.items():
            if path == old or path.startswith(old + "."):
                return new + path[len(old) :]
        m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)(?:\.(.*))?$", path)
        if m:
            i, kind, j, tail = int(m[1]), m[2], int(m[3]), m[4] or ""
            if kind == "resnets":
                return f"input_blocks.{n_down * i + j + 1}.0." + _map_resnet_tail(tail)
            if kind == "attentions":
                return f"input_blocks.{n_down * i + j + 1}.1" + ("." + tail if tail else "")
            tail = "op" + tail[len("conv") :] if tail.startswith("conv") else tail
            return f"input_blocks.{n_down * i + layers_per_block + 1}.0." + tail
        m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$", path)
        if m:
            kind, j, tail = m[1], int(m[2]), m[3] or ""
            if kind == "resnets":
                return f"middle_block.{2 * j}." + _map_resnet_tail(tail)
            return "middle_block.1" + ("." + tail if tail else "")
        m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)(?:\.(.*))?$", path)
        if m:
            i, kind, j, tail = int(m[1]), m[2], int(m[3]), m[4] or ""
            if kind == "resnets":
                return f"output_blocks.{n_up * i + j}.0." + _map_resnet_tail(tail)
            if kind == "attentions":
                return f"output_blocks.{n_up * i + j}.1" + ("." + tail if tail else "")
            slot = 2 if i in up_blocks_with_attention else 1
            return f"output_blocks.{n_up * i + layers_per_block}.{slot}" + ("." + tail if tail else "")
        raise ValueError(f"unet: module path {path!r} has no SGM equivalent in the SDXL name map")

    return mapper


def sdxl_unet_path_mapper(unet: nn.Module) -> PathMapper:
    if _is_sgm_layout(unet):
        return identity_path
    cfg = unet.config
    lpb = cfg.layers_per_block
    if not isinstance(lpb, int):
        raise ValueError(f"unet: layers_per_block={lpb!r} per level is not supported for SDXL naming")
    with_attn = {i for i, t in enumerate(cfg.up_block_types) if "CrossAttn" in t}
    return make_diffusers_to_sgm(lpb, with_attn)


def sdxl_te_path_mapper(te: nn.Module) -> PathMapper:
    # transformers 5 dropped CLIPTextModel's `text_model` wrapper; file keys keep it (SGM/HF-4 layout).
    if hasattr(te, "text_model"):
        return identity_path

    def mapper(path: str) -> str:
        return "text_model." + path

    return mapper


def _warn_llm_adapter(args: object) -> None:
    if getattr(args, "train_llm_adapter", False):
        import logging

        logging.getLogger(__name__).warning("train_llm_adapter is an Anima option; ignored for SDXL")


SDXL = Architecture(
    name="sdxl",
    detect_unet=is_sdxl_unet,
    detect_text_encoders=is_sdxl_text_encoders,
    unet_target_classes=("Transformer2DModel",),
    conv_target_classes=("ResnetBlock2D", "Downsample2D", "Upsample2D"),
    te_target_classes=("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP"),
    unet_prefix="lora_unet",
    te_prefixes=("lora_te1", "lora_te2"),
    default_excludes=(),
    unet_path_mapper=sdxl_unet_path_mapper,
    te_path_mapper=sdxl_te_path_mapper,
    warn_unsupported=_warn_llm_adapter,
)
