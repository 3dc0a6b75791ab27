"""Key maps between diffusers/transformers SDXL modules and the single-file SGM layout.

Every map here is a pure function of key names (facts of the two published layouts), written as
one diffusers->SGM direction per component; loading inverts it by building the forward table for
the keys the target module actually has, so saving and loading can never drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from library.sdxl import config as sdxl_config
from networks.arch.sdxl import make_diffusers_to_sgm

UNET_PREFIX = "model.diffusion_model."
TE1_PREFIX = "conditioner.embedders.0.transformer."
TE2_PREFIX = "conditioner.embedders.1.model."
VAE_PREFIX = "first_stage_model."
# sizes no tensor reveals: SDXL's values (the tiny model writes its own into file metadata)
DEFAULT_ARCH = {"head_dim": 64, "unet_groups": 32, "vae_groups": 32, "unet_sample": 128, "vae_sample": 1024}


def unet_key_mapper(up_block_types: list[str], layers_per_block: int) -> Callable[[str], str]:
    """diffusers UNet2DConditionModel state-dict key -> SGM `model.diffusion_model` key (no prefix).

    A key is a module path plus a parameter name, so this reuses the module-path map that network
    naming uses (networks/arch/sdxl.py): one table for both, so checkpoint keys and network names
    cannot drift apart.
    """
    with_attention = {i for i, t in enumerate(up_block_types) if "CrossAttn" in t}
    path_to_sgm = make_diffusers_to_sgm(layers_per_block, with_attention)

    def key_to_sgm(key: str) -> str:
        path, _, param = key.rpartition(".")
        return path_to_sgm(path) + "." + param

    return key_to_sgm


def unet_state_to_sgm(sd: dict[str, torch.Tensor], up_block_types: list[str], layers_per_block: int) -> dict:
    key_to_sgm = unet_key_mapper(up_block_types, layers_per_block)
    return {UNET_PREFIX + key_to_sgm(k): v for k, v in sd.items()}


# ---------------------------------------------------------------- VAE (LDM first_stage_model)

_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key_to_ldm(key: str, num_levels: int) -> str:
    """diffusers AutoencoderKL key -> LDM VAE key (without `first_stage_model.`)."""
    for side in ("encoder", "decoder"):
        if not key.startswith(side + "."):
            continue
        k = key[len(side) + 1 :]
        if k.startswith("conv_norm_out."):
            return f"{side}.norm_out." + k[len("conv_norm_out.") :]
        m = re.match(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.([a-z_0-9]+)\.(.*)", k)
        if m:
            level = int(m[2]) if m[1] == "down" else num_levels - 1 - int(m[2])
            return f"{side}.{m[1]}.{level}.block.{m[3]}.{_VAE_RESNET.get(m[4], m[4])}.{m[5]}"
        m = re.match(r"(down|up)_blocks\.(\d+)\.(downsamplers|upsamplers)\.0\.conv\.(.*)", k)
        if m:
            level = int(m[2]) if m[1] == "down" else num_levels - 1 - int(m[2])
            return f"{side}.{m[1]}.{level}.{m[3][:-2]}.conv.{m[4]}"
        m = re.match(r"mid_block\.resnets\.(\d+)\.([a-z_0-9]+)\.(.*)", k)
        if m:
            return f"{side}.mid.block_{int(m[1]) + 1}.{_VAE_RESNET.get(m[2], m[2])}.{m[3]}"
        m = re.match(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)", k)
        if m:
            return f"{side}.mid.attn_1.{_VAE_ATTN[m[1]]}.{m[2]}"
        return key
    return key  # quant_conv, post_quant_conv


def vae_state_to_ldm(sd: dict[str, torch.Tensor], num_levels: int, prefix: str = VAE_PREFIX) -> dict:
    out = {}
    for k, v in sd.items():
        lk = vae_key_to_ldm(k, num_levels)
        if ".mid.attn_1." in lk and lk.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]  # LDM stores the attention projections as 1x1 convs
        out[prefix + lk] = v
    return out


# ---------------------------------------------------------------- TE2 (OpenCLIP bigG)

_OC_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}

# HF -> OpenCLIP names of the embeddings (the final norm and the projection have their own rules below)
_OC_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
}


def te2_state_to_openclip(sd: dict[str, torch.Tensor], logit_scale: torch.Tensor | None = None) -> dict:
    """HF CLIPTextModelWithProjection state -> OpenCLIP keys under `conditioner.embedders.1.model.`."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k == "text_model.embeddings.position_ids":
            continue
        if k in _OC_TOP:
            out[_OC_TOP[k]] = v
        elif k.startswith("text_model.final_layer_norm."):
            out["ln_final." + k.rsplit(".", 1)[1]] = v
        elif k == "text_projection.weight":
            out["text_projection"] = v.t().contiguous()  # OpenCLIP computes x @ P; HF Linear x @ W^T
        else:
            m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)\.(weight|bias)$", k)
            if not m:
                raise KeyError(f"TE2 key {k!r} has no OpenCLIP equivalent")
            n, part, kind = m[1], m[2], m[3]
            if part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault(f"transformer.resblocks.{n}.attn.in_proj_{kind}", {})[part[-6]] = v
            else:
                out[f"transformer.resblocks.{n}.{_OC_LAYER[part]}.{kind}"] = v
    for k, parts in qkv.items():
        out[k] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if logit_scale is not None:
        out["logit_scale"] = logit_scale
    return {TE2_PREFIX + k: v for k, v in out.items()}


def openclip_to_te2_state(oc: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """OpenCLIP keys (prefix removed) -> HF state dict; returns (state, logit_scale or None)."""
    inv_layer = {v: k for k, v in _OC_LAYER.items()}
    inv_top = {v: k for k, v in _OC_TOP.items()}
    out: dict[str, torch.Tensor] = {}
    logit_scale = None
    for k, v in oc.items():
        if k == "logit_scale":
            logit_scale = v
        elif k in inv_top:
            out[inv_top[k]] = v
        elif k.startswith("ln_final."):
            out["text_model.final_layer_norm." + k.rsplit(".", 1)[1]] = v
        elif k == "text_projection":
            out["text_projection.weight"] = v.t().contiguous()
        else:
            m = re.match(r"transformer\.resblocks\.(\d+)\.(.*)$", k)
            if not m:
                out["<unexpected>." + k] = v  # surfaced by the caller's unexpected-key check
                continue
            n, rest = m[1], m[2]
            base = f"text_model.encoder.layers.{n}."
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]
                q, kk, vv = v.chunk(3, dim=0)
                # clones: three views of one storage would be saved as shared tensors later
                out[base + f"self_attn.q_proj.{kind}"] = q.clone()
                out[base + f"self_attn.k_proj.{kind}"] = kk.clone()
                out[base + f"self_attn.v_proj.{kind}"] = vv.clone()
            else:
                part, kind = rest.rsplit(".", 1)
                if part not in inv_layer:
                    out["<unexpected>." + k] = v
                    continue
                out[base + f"{inv_layer[part]}.{kind}"] = v
    return out, logit_scale


# ---------------------------------------------------------------- architecture from tensor shapes


def _indices(keys: list[str], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m[1]) for k in keys if (m := rx.match(k))})


def infer_unet_config(u: dict[str, torch.Tensor], arch: dict[str, int], te2_proj_dim: int) -> dict[str, Any]:
    """diffusers UNet config from SGM UNet tensors (prefix removed)."""
    keys = list(u)
    n_in = max(_indices(keys, r"input_blocks\.(\d+)\.")) + 1
    op_blocks = [i for i in _indices(keys, r"input_blocks\.(\d+)\.0\.op\.")]
    levels = len(op_blocks) + 1
    lpb = (n_in - 1 - (levels - 1)) // levels
    per = lpb + 1
    channels, attn, depth = [], [], []
    for lv in range(levels):
        first = per * lv + 1
        channels.append(u[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0])
        has_attn = f"input_blocks.{first}.1.proj_in.weight" in u
        attn.append(has_attn)
        n_tb = (
            len(_indices(keys, rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.")) if has_attn else 1
        )
        depth.append(n_tb)
    any_attn = next(i for i, a in enumerate(attn) if a)
    proj_in = u[f"input_blocks.{per * any_attn + 1}.1.proj_in.weight"]
    cross_dim = u[f"input_blocks.{per * any_attn + 1}.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    add_in = u["label_emb.0.0.weight"].shape[1]
    cfg = dict(sdxl_config.SDXL_UNET_CONFIG)
    cfg.update(
        sample_size=arch["unet_sample"],
        in_channels=u["input_blocks.0.0.weight"].shape[1],
        out_channels=u["out.2.weight"].shape[0],
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        block_out_channels=channels,
        layers_per_block=lpb,
        transformer_layers_per_block=depth,
        attention_head_dim=[c // arch["head_dim"] for c in channels],
        cross_attention_dim=cross_dim,
        use_linear_projection=proj_in.ndim == 2,
        addition_time_embed_dim=(add_in - te2_proj_dim) // 6,
        projection_class_embeddings_input_dim=add_in,
        norm_num_groups=arch["unet_groups"],
    )
    return cfg


def infer_te_config(hf: dict[str, torch.Tensor], head_dim: int, base: dict[str, Any]) -> dict[str, Any]:
    """transformers CLIPTextConfig dict from HF-named CLIP text tensors."""
    tok = hf["text_model.embeddings.token_embedding.weight"]
    cfg = dict(base)
    cfg.update(
        vocab_size=tok.shape[0],
        hidden_size=tok.shape[1],
        max_position_embeddings=hf["text_model.embeddings.position_embedding.weight"].shape[0],
        num_hidden_layers=len(_indices(list(hf), r"text_model\.encoder\.layers\.(\d+)\.")),
        intermediate_size=hf["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_attention_heads=tok.shape[1] // head_dim,
    )
    if "text_projection.weight" in hf:
        cfg["projection_dim"] = hf["text_projection.weight"].shape[0]
    return cfg


def infer_vae_config(v: dict[str, torch.Tensor], arch: dict[str, int]) -> dict[str, Any]:
    """diffusers AutoencoderKL config from LDM VAE tensors (prefix removed)."""
    keys = list(v)
    levels = _indices(keys, r"encoder\.down\.(\d+)\.")
    cfg = dict(sdxl_config.SDXL_VAE_CONFIG)
    cfg.update(
        in_channels=v["encoder.conv_in.weight"].shape[1],
        out_channels=v["decoder.conv_out.weight"].shape[0],
        down_block_types=["DownEncoderBlock2D"] * len(levels),
        up_block_types=["UpDecoderBlock2D"] * len(levels),
        block_out_channels=[v[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in levels],
        layers_per_block=len(_indices(keys, r"encoder\.down\.0\.block\.(\d+)\.")),
        latent_channels=v["post_quant_conv.weight"].shape[0],
        norm_num_groups=arch["vae_groups"],
        sample_size=arch["vae_sample"],
    )
    return cfg
