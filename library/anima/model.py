"""Anima DiT (Cosmos-Predict2 "MiniTrainDIT" layout); its LLM adapter is in `library.anima.llm_adapter`.

The module tree (class names and attribute paths) mirrors the released checkpoint so that state-dict keys
load 1:1 after stripping `net.` and so that network targeting sees the sd-scripts class names
(`Block`, `PatchEmbed`, `TimestepEmbedding`, `FinalLayer`, `LLMAdapterTransformerBlock`).
Widths and depths are config values; `anima_config_from_state_dict` infers them from checkpoint tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# AnimaConfig, the config helpers and the adapter classes are re-exported: tests, bench and tools import
# them from here
from library.anima.config import AnimaConfig, anima_config_from_state_dict, tiny_anima_config
from library.anima.kernels import modulated_norm
from library.anima.layers import RMSNorm, apply_rope, gated_residual
from library.anima.llm_adapter import LLMAdapter, LLMAdapterTransformerBlock

__all__ = [
    "OPTIONAL_DIT_BUFFERS",
    "Anima",
    "AnimaConfig",
    "Block",
    "LLMAdapter",
    "LLMAdapterTransformerBlock",
    "anima_config_from_state_dict",
    "tiny_anima_config",
]

# Buffers that some checkpoints carry; we recompute them, so they are accepted and ignored on load.
OPTIONAL_DIT_BUFFERS = (
    "pos_embedder.seq",
    "pos_embedder.dim_spatial_range",
    "pos_embedder.dim_temporal_range",
)


# ----------------------------------------------------------------------------------------------- DiT parts
class _Patchify(nn.Module):
    """(B,C,T,H,W) -> (B,T',H',W', C*pt*p*p), channel-major inside the patch (index c*4 + dy*2 + dx)."""

    def __init__(self, p: int, pt: int) -> None:
        super().__init__()
        self.p, self.pt = p, pt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        p, pt = self.p, self.pt
        x = x.reshape(b, c, t // pt, pt, h // p, p, w // p, p)
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # b t h w c r m n
        return x.reshape(b, t // pt, h // p, w // p, c * pt * p * p)


class PatchEmbed(nn.Module):
    def __init__(self, p: int, pt: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            _Patchify(p, pt), nn.Linear(in_channels * p * p * pt, out_channels, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class VideoRopePosition3DEmb(nn.Module):
    """3D RoPE: head dim split into t | h | w bands; integer patch positions from 0; NTK-scaled theta."""

    def __init__(
        self,
        head_dim: int,
        max_t: int,
        max_h: int,
        max_w: int,
        h_ratio: float,
        w_ratio: float,
        t_ratio: float,
    ) -> None:
        super().__init__()
        if head_dim % 2 or head_dim < 12:
            raise ValueError(f"RoPE head_dim must be even and >= 12, got {head_dim}")
        self.max_t, self.max_h, self.max_w = max_t, max_h, max_w
        self.dim_h = self.dim_w = (head_dim // 6) * 2
        self.dim_t = head_dim - 2 * self.dim_h
        theta_hw = 10000.0 * h_ratio ** (self.dim_h / (self.dim_h - 2))
        theta_ww = 10000.0 * w_ratio ** (self.dim_w / (self.dim_w - 2))
        theta_t = 10000.0 * t_ratio ** (self.dim_t / (self.dim_t - 2))
        # Non-persistent: recomputed, so checkpoints with or without these buffers load the same.
        self.register_buffer("freq_h", self._freqs(self.dim_h, theta_hw), persistent=False)
        self.register_buffer("freq_w", self._freqs(self.dim_w, theta_ww), persistent=False)
        self.register_buffer("freq_t", self._freqs(self.dim_t, theta_t), persistent=False)

    @staticmethod
    def _freqs(dim: int, theta: float) -> torch.Tensor:
        i = torch.arange(0, dim, 2, dtype=torch.float64)
        return (1.0 / theta ** (i / dim)).float()

    def forward(self, t: int, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if t > self.max_t or h > self.max_h or w > self.max_w:
            raise ValueError(
                f"latent grid {t}x{h}x{w} patches exceeds the RoPE maximum {self.max_t}x{self.max_h}x{self.max_w}"
            )
        # the buffers move with the model: an upload here (a blocking copy mid-forward) is for odd set-ups only
        freq_t, freq_h, freq_w = (
            f if f.device == device else f.to(device) for f in (self.freq_t, self.freq_h, self.freq_w)
        )
        ft = torch.outer(torch.arange(t, device=device, dtype=torch.float32), freq_t)
        fh = torch.outer(torch.arange(h, device=device, dtype=torch.float32), freq_h)
        fw = torch.outer(torch.arange(w, device=device, dtype=torch.float32), freq_w)
        ang = torch.cat(
            [
                ft[:, None, None, :].expand(t, h, w, -1),
                fh[None, :, None, :].expand(t, h, w, -1),
                fw[None, None, :, :].expand(t, h, w, -1),
            ],
            dim=-1,
        ).reshape(t * h * w, -1)
        ang = torch.cat([ang, ang], dim=-1)
        return ang.cos(), ang.sin()


class Timesteps(nn.Module):
    """Sinusoid of sigma in [0,1] (not x1000): [cos(t f), sin(t f)], f_k = exp(-ln(1e4) k / (D/2))."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        k = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(10000.0) * k / half)
        ang = t.float()[:, None] * freqs[None]
        return torch.cat([ang.cos(), ang.sin()], dim=-1).to(t.dtype)


class TimestepEmbedding(nn.Module):
    """Returns (raw sinusoid, shared adaLN-LoRA term of width 3D)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(dim, dim, bias=False)
        self.activation = nn.SiLU()
        self.linear_2 = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sample, self.linear_2(self.activation(self.linear_1(sample)))


class Attention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.q_proj = nn.Linear(query_dim, inner, bias=False)
        self.q_norm = RMSNorm(head_dim)
        self.k_proj = nn.Linear(context_dim, inner, bias=False)
        self.k_norm = RMSNorm(head_dim)
        self.v_proj = nn.Linear(context_dim, inner, bias=False)
        self.v_norm = nn.Identity()
        self.output_proj = nn.Linear(inner, query_dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_inputs: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """kv_inputs: the key and value projections' inputs as separate tensors (equal to context, or to x
        for self-attention): the fused adaLN norm hands each projection its own output so that their
        gradients reach it separately."""
        ctx = x if context is None else context
        k_in, v_in = (ctx, ctx) if kv_inputs is None else kv_inputs
        b = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(b, -1, self.heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(k_in).view(b, -1, self.heads, self.head_dim)).transpose(1, 2)
        v = self.v_norm(self.v_proj(v_in).view(b, -1, self.heads, self.head_dim)).transpose(1, 2)
        if rope is not None:
            # the fp32 table: the kernel rounds it to q's dtype as it reads it, the torch path casts
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.output_proj(out.transpose(1, 2).reshape(b, -1, self.heads * self.head_dim))


class GPT2FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.layer1 = nn.Linear(dim, hidden, bias=False)
        self.activation = nn.GELU()
        self.layer2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.activation(self.layer1(x)))


def modulate(h: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """h·(1 + scale) + shift (adaLN). Under autocast the LayerNorm output h is fp32 and this is one fused
    pass instead of two over a (B, L, D) fp32 tensor (the same maths within one fp32 rounding); in half
    precision it keeps the two roundings of the separate product and sum."""
    if h.dtype == torch.float32:
        return torch.addcmul(shift, h, 1 + scale)
    return h * (1 + scale) + shift


def modulated_norm_inputs(
    norm: nn.LayerNorm, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, n: int = 1
) -> tuple[torch.Tensor, ...]:
    """modulate(norm(x), scale, shift) for n consumers. Under CUDA autocast (see `modulated_norm.usable`)
    one Triton pass yields the half-precision tensor each consumer's autocast cast would have made, one
    output per consumer so their grads are summed in fp32 as before; otherwise the same tensor n times."""
    if modulated_norm.usable(x, scale, shift, norm):
        return modulated_norm.modulated_layer_norm(x, scale, shift, norm.eps, n)
    return (modulate(norm(x), scale, shift),) * n


def _adaln(dim: int, lora_dim: int, n: int) -> nn.Sequential:
    return nn.Sequential(
        nn.SiLU(), nn.Linear(dim, lora_dim, bias=False), nn.Linear(lora_dim, n * dim, bias=False)
    )


class Block(nn.Module):
    """Self-attn (RoPE) -> cross-attn (unmasked) -> MLP, each adaLN-modulated with a gated residual."""

    def __init__(self, cfg: AnimaConfig) -> None:
        super().__init__()
        d = cfg.model_channels
        self.layer_norm_self_attn = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.self_attn = Attention(d, d, cfg.num_heads, cfg.head_dim)
        self.layer_norm_cross_attn = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.cross_attn = Attention(d, cfg.crossattn_emb_channels, cfg.num_heads, cfg.head_dim)
        self.layer_norm_mlp = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = GPT2FeedForward(d, cfg.mlp_hidden)
        self.adaln_modulation_self_attn = _adaln(d, cfg.adaln_lora_dim, 3)
        self.adaln_modulation_cross_attn = _adaln(d, cfg.adaln_lora_dim, 3)
        self.adaln_modulation_mlp = _adaln(d, cfg.adaln_lora_dim, 3)

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        adaln_lora: torch.Tensor,
        context: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        # x: (B, L, D); emb: (B, D); adaln_lora: (B, 3D). Modulation broadcasts over every token.
        def mod(seq: nn.Sequential) -> list[torch.Tensor]:
            return [m[:, None, :] for m in (seq(emb) + adaln_lora).chunk(3, dim=-1)]

        shift, scale, gate = mod(self.adaln_modulation_self_attn)
        q_in, k_in, v_in = modulated_norm_inputs(self.layer_norm_self_attn, x, scale, shift, 3)
        x = gated_residual(x, gate, self.self_attn(q_in, rope=rope, kv_inputs=(k_in, v_in)))
        shift, scale, gate = mod(self.adaln_modulation_cross_attn)
        (h,) = modulated_norm_inputs(self.layer_norm_cross_attn, x, scale, shift)
        x = gated_residual(x, gate, self.cross_attn(h, context=context))
        shift, scale, gate = mod(self.adaln_modulation_mlp)
        (h,) = modulated_norm_inputs(self.layer_norm_mlp, x, scale, shift)
        return gated_residual(x, gate, self.mlp(h))


class FinalLayer(nn.Module):
    def __init__(self, cfg: AnimaConfig) -> None:
        super().__init__()
        d = cfg.model_channels
        out = cfg.patch_spatial**2 * cfg.patch_temporal * cfg.out_channels
        self.layer_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(d, out, bias=False)
        self.adaln_modulation = _adaln(d, cfg.adaln_lora_dim, 2)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, adaln_lora: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        shift, scale = (self.adaln_modulation(emb) + adaln_lora[:, : 2 * d]).chunk(2, dim=-1)
        (h,) = modulated_norm_inputs(self.layer_norm, x, scale[:, None], shift[:, None])
        return self.linear(h)


# ----------------------------------------------------------------------------------------------- root
class Anima(nn.Module):
    """The Anima DiT. forward(x (B,16,T,H,W), timesteps (B,) sigma in [0,1], context) -> velocity."""

    def __init__(self, cfg: AnimaConfig) -> None:
        super().__init__()
        self.config = cfg
        d, p, pt = cfg.model_channels, cfg.patch_spatial, cfg.patch_temporal
        in_ch = cfg.in_channels + (1 if cfg.concat_padding_mask else 0)
        self.x_embedder = PatchEmbed(p, pt, in_ch, d)
        self.pos_embedder = VideoRopePosition3DEmb(
            cfg.head_dim,
            cfg.max_frames // pt,
            cfg.max_img_h // p,
            cfg.max_img_w // p,
            cfg.rope_h_extrapolation_ratio,
            cfg.rope_w_extrapolation_ratio,
            cfg.rope_t_extrapolation_ratio,
        )
        self.t_embedder = nn.Sequential(Timesteps(d), TimestepEmbedding(d))
        self.t_embedding_norm = RMSNorm(d)
        self.llm_adapter = LLMAdapter(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_blocks))
        self.final_layer = FinalLayer(cfg)
        self.gradient_checkpointing = False
        self.checkpoint_preserve_rng = True

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj[1].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.x_embedder.proj[1].weight.device

    def enable_gradient_checkpointing(self, preserve_rng_state: bool = True) -> None:
        self.gradient_checkpointing = True
        self.checkpoint_preserve_rng = preserve_rng_state  # False under --cuda_graph (nothing random inside)

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False

    def run_llm_adapter(
        self,
        source_hidden_states: torch.Tensor,
        target_input_ids: torch.Tensor,
        target_attention_mask: torch.Tensor | None = None,
        source_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Adapter output with rows where the T5 mask is 0 set to zero (the DiT context)."""
        out = self.llm_adapter(
            source_hidden_states, target_input_ids, target_attention_mask, source_attention_mask
        )
        if (
            target_attention_mask is not None
        ):  # where(), not a product: a NaN in a padded row must not survive
            out = torch.where(target_attention_mask.bool()[..., None], out, out.new_zeros(()))
        return out

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        target_input_ids: torch.Tensor | None = None,
        target_attention_mask: torch.Tensor | None = None,
        source_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 5:
            raise ValueError(f"Anima DiT input x must be (B, C, T, H, W); got shape {tuple(x.shape)}")
        b, _, t, h, w = x.shape
        p, pt = cfg.patch_spatial, cfg.patch_temporal
        if h % p or w % p or t % pt:
            raise ValueError(f"latent size T,H,W={t},{h},{w} must be divisible by {pt},{p},{p}")
        if target_input_ids is not None:
            context = self.run_llm_adapter(
                context, target_input_ids, target_attention_mask, source_attention_mask
            )
        if cfg.concat_padding_mask:
            if padding_mask is None:
                pm = x.new_zeros(b, 1, t, h, w)
            else:
                pm = F.interpolate(padding_mask.to(x.dtype), size=(h, w), mode="nearest")
                pm = pm[:, :, None].expand(b, 1, t, h, w)
            x = torch.cat([x, pm], dim=1)
        tokens = self.x_embedder(x.to(self.dtype))  # (B, T', H', W', D)
        tt, hh, ww = tokens.shape[1:4]
        tokens = tokens.reshape(b, tt * hh * ww, -1)
        rope = self.pos_embedder(tt, hh, ww, tokens.device)
        if timesteps.ndim != 1 or timesteps.shape[0] != b:
            raise ValueError(f"timesteps must have shape ({b},); got {tuple(timesteps.shape)}")
        # Inputs follow the weight dtype (autocast, when active, still decides the matmul precision).
        sinus, adaln_lora = self.t_embedder(timesteps.to(self.dtype))
        emb = self.t_embedding_norm(sinus)
        context = context.to(self.dtype)
        for blk in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(
                    blk, tokens, emb, adaln_lora, context, rope,
                    use_reentrant=False, preserve_rng_state=self.checkpoint_preserve_rng,
                )  # fmt: skip
            else:
                tokens = blk(tokens, emb, adaln_lora, context, rope)
        out = self.final_layer(tokens, emb, adaln_lora)  # (B, L, p*p*pt*C), index (r, m, n, c)
        c = cfg.out_channels
        out = out.reshape(b, tt, hh, ww, pt, p, p, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(b, c, tt * pt, hh * p, ww * p)
