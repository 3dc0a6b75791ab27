"""Architecture configs for SDXL: the real sizes (facts of the released model) and a tiny variant.

The tiny variant keeps the real block layout (three down levels, the first without attention,
SDXL's text-time conditioning, two CLIP text encoders) so module names and key layouts match the
real model; only widths and depths shrink so that CPU tests and the demo run in seconds.
"""

from __future__ import annotations

import copy
from typing import Any

# diffusers UNet2DConditionModel config of SDXL base 1.0
SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "upcast_attention": False,
}

# transformers CLIPTextConfig of CLIP ViT-L/14 (SDXL text encoder 1)
SDXL_TE1_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}

# transformers CLIPTextConfig of OpenCLIP ViT-bigG/14 (SDXL text encoder 2, with projection)
SDXL_TE2_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}

# diffusers AutoencoderKL config of the SDXL VAE
SDXL_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
    "act_fn": "silu",
}

SDXL_VAE_SCALE_FACTOR = 0.13025


def tiny_sdxl_configs() -> dict[str, dict[str, Any]]:
    """Configs of a tiny SDXL: same block types and conditioning, small widths and depths."""
    unet = copy.deepcopy(SDXL_UNET_CONFIG)
    unet.update(
        sample_size=16,
        block_out_channels=[32, 64, 64],
        transformer_layers_per_block=[1, 1, 2],
        attention_head_dim=[2, 4, 4],
        cross_attention_dim=64,  # te1 hidden (32) + te2 hidden (32)
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six size scalars + te2 projection
        norm_num_groups=16,
    )
    te1 = copy.deepcopy(SDXL_TE1_CONFIG)
    te1.update(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, projection_dim=32
    )
    te2 = copy.deepcopy(SDXL_TE2_CONFIG)
    te2.update(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, projection_dim=32
    )
    vae = copy.deepcopy(SDXL_VAE_CONFIG)
    vae.update(block_out_channels=[16, 32, 32, 32], layers_per_block=1, norm_num_groups=8, sample_size=64)
    return {"unet": unet, "text_encoder": te1, "text_encoder_2": te2, "vae": vae}
