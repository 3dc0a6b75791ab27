"""Anima's hyper-parameters: the released 2B model's, a tiny one for tests, and reading them off a file."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass
class AnimaConfig:
    """DiT + adapter hyper-parameters. Defaults are the released 2B model."""

    in_channels: int = 16
    out_channels: int = 16
    patch_spatial: int = 2
    patch_temporal: int = 1
    concat_padding_mask: bool = True
    model_channels: int = 2048
    num_blocks: int = 28
    num_heads: int = 16
    mlp_hidden: int = 8192
    crossattn_emb_channels: int = 1024
    adaln_lora_dim: int = 256
    max_img_h: int = 512
    max_img_w: int = 512
    max_frames: int = 128
    rope_h_extrapolation_ratio: float = 4.0
    rope_w_extrapolation_ratio: float = 4.0
    rope_t_extrapolation_ratio: float = 1.0
    # LLM adapter
    adapter_source_dim: int = 1024
    adapter_target_dim: int = 1024
    adapter_model_dim: int = 1024
    adapter_num_layers: int = 6
    adapter_num_heads: int = 16
    adapter_mlp_hidden: int = 4096
    adapter_vocab_size: int = 32128

    @property
    def head_dim(self) -> int:
        return self.model_channels // self.num_heads


def tiny_anima_config() -> AnimaConfig:
    """Tiny widths and depths with the real key layout, so CPU tests exercise the real module tree."""
    return AnimaConfig(
        model_channels=64,
        num_blocks=2,
        num_heads=4,
        mlp_hidden=256,
        crossattn_emb_channels=32,
        adaln_lora_dim=16,
        max_img_h=64,
        max_img_w=64,
        max_frames=1,
        adapter_source_dim=32,
        adapter_target_dim=32,
        adapter_model_dim=32,
        adapter_num_layers=2,
        adapter_num_heads=4,
        adapter_mlp_hidden=128,
    )


def _count_indexed(keys: list[str], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for k in keys if (m := pat.match(k))}
    if idx != set(range(len(idx))):
        raise ValueError(f"checkpoint has non-contiguous '{prefix}N' indices: {sorted(idx)}")
    return len(idx)


def anima_config_from_state_dict(sd: dict[str, torch.Tensor], source: str = "checkpoint") -> AnimaConfig:
    """Infer widths and depths from tensor shapes (keys without `net.`). Raises on a non-Anima state dict."""
    required = (
        "x_embedder.proj.1.weight",
        "blocks.0.self_attn.q_norm.weight",
        "final_layer.linear.weight",
        "t_embedder.1.linear_1.weight",
        "llm_adapter.embed.weight",
        "llm_adapter.blocks.0.self_attn.q_norm.weight",
    )
    missing = [k for k in required if k not in sd]
    if missing:
        sample = ", ".join(sorted(sd)[:3])
        raise ValueError(
            f"{source} is not an Anima DiT checkpoint: missing {missing} (expected keys like "
            f"'net.blocks.0.self_attn.q_proj.weight'; found e.g. {sample})"
        )
    keys = list(sd)
    d, patch_in = sd["x_embedder.proj.1.weight"].shape
    head_dim = sd["blocks.0.self_attn.q_norm.weight"].shape[0]
    p, pt = 2, 1
    in_ch = patch_in // (p * p * pt) - 1  # concat_padding_mask adds one channel
    out_ch = sd["final_layer.linear.weight"].shape[0] // (p * p * pt)
    a_head = sd["llm_adapter.blocks.0.self_attn.q_norm.weight"].shape[0]
    a_model = sd["llm_adapter.blocks.0.self_attn.q_proj.weight"].shape[0]
    vocab, a_target = sd["llm_adapter.embed.weight"].shape
    return AnimaConfig(
        in_channels=in_ch,
        out_channels=out_ch,
        patch_spatial=p,
        patch_temporal=pt,
        model_channels=d,
        num_blocks=_count_indexed(keys, "blocks."),
        num_heads=d // head_dim,
        mlp_hidden=sd["blocks.0.mlp.layer1.weight"].shape[0],
        crossattn_emb_channels=sd["blocks.0.cross_attn.k_proj.weight"].shape[1],
        adaln_lora_dim=sd["blocks.0.adaln_modulation_self_attn.1.weight"].shape[0],
        adapter_source_dim=sd["llm_adapter.blocks.0.cross_attn.k_proj.weight"].shape[1],
        adapter_target_dim=a_target,
        adapter_model_dim=a_model,
        adapter_num_layers=_count_indexed(keys, "llm_adapter.blocks."),
        adapter_num_heads=a_model // a_head,
        adapter_mlp_hidden=sd["llm_adapter.blocks.0.mlp.0.weight"].shape[0],
        adapter_vocab_size=vocab,
    )
