"""Anima's LLM adapter: T5 token ids cross-attend to Qwen3 hidden states and become the DiT's context.

It is part of the DiT checkpoint (keys `llm_adapter.*`) and runs with grad in training, since a network
may adapt its Linear layers (`LLMAdapterTransformerBlock` is a target class name).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from library.anima.config import AnimaConfig
from library.anima.layers import LLMAdapterRMSNorm, apply_rope


class AdapterRotaryEmbedding(nn.Module):
    """HF-style rotary table (theta 1e4); cos/sin computed in fp32 then cast to the activations' dtype."""

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, length: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(length, device=like.device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq.to(like.device).float())
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(like.dtype), emb.sin().to(like.dtype)


class LLMAdapterAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, query_dim // heads
        self.q_proj = nn.Linear(query_dim, query_dim, bias=False)
        self.q_norm = LLMAdapterRMSNorm(self.head_dim)
        self.k_proj = nn.Linear(context_dim, query_dim, bias=False)
        self.k_norm = LLMAdapterRMSNorm(self.head_dim)
        self.v_proj = nn.Linear(context_dim, query_dim, bias=False)
        self.o_proj = nn.Linear(query_dim, query_dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        mask: torch.Tensor | None,
        rope_q: tuple[torch.Tensor, torch.Tensor],
        rope_k: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        b = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(b, -1, self.heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(context).view(b, -1, self.heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(context).view(b, -1, self.heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *rope_q), apply_rope(k, *rope_k)  # apply_rope casts the table to q's dtype
        attn_mask = None if mask is None else mask.bool()[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        if attn_mask is not None:
            # A fully masked row (empty prompt) must attend to nothing: zeros, never NaN (torch#133882).
            out = out.masked_fill(~attn_mask.any(dim=-1, keepdim=True), 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(b, -1, self.heads * self.head_dim))


class LLMAdapterTransformerBlock(nn.Module):
    def __init__(self, source_dim: int, model_dim: int, heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm_self_attn = LLMAdapterRMSNorm(model_dim)
        self.self_attn = LLMAdapterAttention(model_dim, model_dim, heads)
        self.norm_cross_attn = LLMAdapterRMSNorm(model_dim)
        self.cross_attn = LLMAdapterAttention(model_dim, source_dim, heads)
        self.norm_mlp = LLMAdapterRMSNorm(model_dim)
        self.mlp = nn.Sequential(
            nn.Linear(model_dim, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, model_dim)
        )

    def forward(
        self,
        x: torch.Tensor,
        source: torch.Tensor,
        target_mask: torch.Tensor | None,
        source_mask: torch.Tensor | None,
        rope_t: tuple[torch.Tensor, torch.Tensor],
        rope_s: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        h = self.norm_self_attn(x)
        x = x + self.self_attn(h, h, target_mask, rope_t, rope_t)
        x = x + self.cross_attn(self.norm_cross_attn(x), source, source_mask, rope_t, rope_s)
        return x + self.mlp(self.norm_mlp(x))


class LLMAdapter(nn.Module):
    """T5 ids cross-attending to Qwen3 states -> (B, Lt, target_dim) DiT context (padded rows not zeroed here)."""

    def __init__(self, cfg: AnimaConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.adapter_vocab_size, cfg.adapter_target_dim)
        if cfg.adapter_model_dim != cfg.adapter_target_dim:
            self.in_proj: nn.Module = nn.Linear(cfg.adapter_target_dim, cfg.adapter_model_dim)
        else:
            self.in_proj = nn.Identity()
        self.rotary_emb = AdapterRotaryEmbedding(cfg.adapter_model_dim // cfg.adapter_num_heads)
        self.blocks = nn.ModuleList(
            LLMAdapterTransformerBlock(
                cfg.adapter_source_dim, cfg.adapter_model_dim, cfg.adapter_num_heads, cfg.adapter_mlp_hidden
            )
            for _ in range(cfg.adapter_num_layers)
        )
        self.out_proj = nn.Linear(cfg.adapter_model_dim, cfg.adapter_target_dim)
        self.norm = LLMAdapterRMSNorm(cfg.adapter_target_dim)

    def forward(
        self,
        source_hidden_states: torch.Tensor,
        target_input_ids: torch.Tensor,
        target_attention_mask: torch.Tensor | None = None,
        source_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.in_proj(self.embed(target_input_ids))
        source = source_hidden_states.to(x.dtype)
        rope_t = self.rotary_emb(x.shape[1], x)
        rope_s = self.rotary_emb(source.shape[1], x)
        for blk in self.blocks:
            x = blk(x, source, target_attention_mask, source_attention_mask, rope_t, rope_s)
        return self.norm(self.out_proj(x))
