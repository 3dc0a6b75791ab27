"""Anima: DiT + LLM-adapter targets, Qwen3 text-encoder targets and the sd-scripts file naming.

Our DiT (`library.anima.model.Anima`) keeps the released module tree, so DiT paths are already the
file paths (`blocks.0.self_attn.q_proj` -> `lora_unet_blocks_0_self_attn_q_proj`). The Qwen3 paths are
relative to `Qwen3Model` (`layers.0.mlp.up_proj` -> `lora_te_layers_0_mlp_up_proj`); a
`Qwen3ForCausalLM` wrapper's `model.` is dropped so both give the same keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from .base import Architecture, PathMapper, identity_path

DIT_TARGETS = ("Block", "PatchEmbed", "TimestepEmbedding", "FinalLayer")
LLM_ADAPTER_TARGETS = ("LLMAdapterTransformerBlock",)
QWEN3_TARGETS = ("Qwen3Attention", "Qwen3SdpaAttention", "Qwen3FlashAttention2", "Qwen3MLP")
DEFAULT_EXCLUDE = r".*(_modulation|_norm|_embedder|final_layer).*"
_QWEN3_ROOTS = ("Qwen3Model", "Qwen3ForCausalLM")


def is_anima_dit(unet: nn.Module) -> bool:
    """A `blocks` list made only of `Block`s plus the Cosmos embedders/final layer (not "any class named Block")."""
    blocks = getattr(unet, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        return False
    if not all(type(b).__name__ == "Block" for b in blocks):
        return False
    return all(
        isinstance(getattr(unet, a, None), nn.Module) for a in ("x_embedder", "t_embedder", "final_layer")
    )


def is_anima_text_encoders(tes: Sequence[nn.Module]) -> bool:
    return len(tes) == 1 and type(tes[0]).__name__ in _QWEN3_ROOTS


def qwen3_te_path_mapper(te: nn.Module) -> PathMapper:
    if type(te).__name__ != "Qwen3ForCausalLM":
        return identity_path

    def mapper(path: str) -> str:
        return path[len("model.") :] if path.startswith("model.") else path

    return mapper


def _llm_adapter_targets(args: Any) -> tuple[str, ...]:
    return LLM_ADAPTER_TARGETS if getattr(args, "train_llm_adapter", False) else ()


ANIMA = Architecture(
    name="anima",
    detect_unet=is_anima_dit,
    detect_text_encoders=is_anima_text_encoders,
    unet_target_classes=DIT_TARGETS,
    conv_target_classes=(),
    te_target_classes=QWEN3_TARGETS,
    unet_prefix="lora_unet",
    te_prefixes=("lora_te",),
    default_excludes=(DEFAULT_EXCLUDE,),
    unet_path_mapper=lambda unet: identity_path,
    te_path_mapper=qwen3_te_path_mapper,
    extra_unet_targets=_llm_adapter_targets,
)
