"""The models bench/bench_train_step.py times: random-init SDXL U-Net / Anima DiT, ours (diffusers and
library.anima) or sd-scripts' own classes from a baseline checkout, each with the call that runs one
forward from the bench's common inputs (x, t, ctx, pooled, time_ids)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _init_device(args):
    """Build the random-init model directly on the device (CPU init of 2.6 B params takes minutes)."""
    import torch

    return torch.device(args.device)


def _build_anima(args):
    sys.path.insert(0, str(REPO_ROOT))

    from library.anima.model import Anima, AnimaConfig, tiny_anima_config

    cfg = tiny_anima_config() if args.tiny else AnimaConfig()
    with _init_device(args):
        dit = Anima(cfg)
    ctx_dim = cfg.crossattn_emb_channels

    def call(dit_, x, t, ctx, pooled, time_ids):
        # the DiT takes (B, C, T, H, W) latents and sigma in [0, 1]
        return dit_(x[:, :, None], (t.float() / 1000.0).to(x.dtype), ctx)[:, :, 0]

    return dit, call, ctx_dim, 0


def build_diffusers_unet(args):
    sys.path.insert(0, str(REPO_ROOT))
    from diffusers import UNet2DConditionModel

    from library.sdxl.config import SDXL_UNET_CONFIG, tiny_sdxl_configs

    config = tiny_sdxl_configs()["unet"] if args.tiny else SDXL_UNET_CONFIG
    with _init_device(args):
        unet = UNet2DConditionModel(**config)
    ctx_dim = config["cross_attention_dim"]
    pooled_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]

    def call(unet_, x, t, ctx, pooled, time_ids):
        cond = {"text_embeds": pooled, "time_ids": time_ids}
        return unet_(x, t, ctx, added_cond_kwargs=cond).sample

    return unet, call, ctx_dim, pooled_dim


def _build_sd_scripts_unet(args):
    if not args.sd_scripts_path:
        raise SystemExit("--sd_scripts_path is required for sd-* variants")
    sys.path.insert(0, str(Path(args.sd_scripts_path).resolve()))
    if args.tiny:
        raise SystemExit("sd-* variants need the real config (sd-scripts' U-Net class has fixed sizes)")
    import library.sdxl_original_unet as sd_unet
    from library.sdxl_original_unet import SdxlUNet2DConditionModel

    if args.graph_capture:
        # sd-scripts checkpoints with use_reentrant=True, which torch.autograd.grad (used by the graph
        # capture) refuses; its module switch turns on the non-reentrant form, same maths
        sd_unet.USE_REENTRANT = False

    with _init_device(args):
        unet = SdxlUNet2DConditionModel()
    unet.set_use_sdpa(True)

    def call(unet_, x, t, ctx, pooled, time_ids):
        import torch

        # sd-scripts builds y from the pooled embedding and the sinusoidal size embeddings; for timing a
        # random y of the right width is equivalent.
        y = torch.cat([pooled, time_ids.new_zeros(pooled.shape[0], 2816 - pooled.shape[1])], dim=1)
        return unet_(x, t, ctx, y)

    return unet, call, 2048, 1280


# sd-scripts' fixed Anima DiT configuration (library/anima_utils.py of the baseline): the real 2B model
SD_SCRIPTS_ANIMA_CONFIG = {
    "max_img_h": 512, "max_img_w": 512, "max_frames": 128, "in_channels": 16, "out_channels": 16,
    "patch_spatial": 2, "patch_temporal": 1, "model_channels": 2048, "concat_padding_mask": True,
    "crossattn_emb_channels": 1024, "pos_emb_cls": "rope3d", "pos_emb_learnable": True,
    "pos_emb_interpolation": "crop", "min_fps": 1, "max_fps": 30, "use_adaln_lora": True, "adaln_lora_dim": 256,
    "num_blocks": 28, "num_heads": 16, "extra_per_block_abs_pos_emb": False, "rope_h_extrapolation_ratio": 4.0,
    "rope_w_extrapolation_ratio": 4.0, "rope_t_extrapolation_ratio": 1.0, "extra_h_extrapolation_ratio": 1.0,
    "extra_w_extrapolation_ratio": 1.0, "extra_t_extrapolation_ratio": 1.0, "rope_enable_fps_modulation": False,
    "use_llm_adapter": True, "attn_mode": "torch", "split_attn": False,
}  # fmt: skip


def _build_sd_scripts_anima(args):
    if not args.sd_scripts_path:
        raise SystemExit("--sd_scripts_path is required for sdanima-* variants")
    if args.tiny:
        raise SystemExit("sdanima-* variants need the real config")
    sys.path.insert(0, str(Path(args.sd_scripts_path).resolve()))
    from library import anima_models as sd_anima

    with _init_device(args):
        dit = sd_anima.Anima(**SD_SCRIPTS_ANIMA_CONFIG)

    def call(dit_, x, t, ctx, pooled, time_ids):
        pad = x.new_zeros(x.shape[0], 1, x.shape[2], x.shape[3])
        return dit_(x[:, :, None], (t.float() / 1000.0).to(x.dtype), ctx, padding_mask=pad)[:, :, 0]

    return dit, call, 1024, 0


BUILDERS = {"sd": _build_sd_scripts_unet, "sdanima": _build_sd_scripts_anima, "anima": _build_anima}
