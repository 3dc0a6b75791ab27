"""Tiny SDXL builders and runners shared by the network tests (real module tree, small widths)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from library.sdxl.config import tiny_sdxl_configs


@dataclass
class TinySdxl:
    unet: UNet2DConditionModel
    te1: CLIPTextModel
    te2: CLIPTextModelWithProjection

    @property
    def tes(self) -> list[nn.Module]:
        return [self.te1, self.te2]

    def clone(self) -> TinySdxl:
        return TinySdxl(copy.deepcopy(self.unet), copy.deepcopy(self.te1), copy.deepcopy(self.te2))


def build_tiny_sdxl(seed: int = 0) -> TinySdxl:
    cfg = tiny_sdxl_configs()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg["unet"]).eval()
    te1 = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])).eval()
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"])).eval()
    return TinySdxl(unet, te1, te2)


def unet_inputs(seed: int = 1) -> tuple:
    # 8×8 latents still pass all three levels (8 → 4 → 2) and keep a U-Net forward in tens of ms
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g)
    t = torch.tensor([700])
    ctx = torch.randn(1, 7, 64, generator=g)
    added = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.randn(1, 6, generator=g)}
    return x, t, ctx, added


def run_unet(unet: nn.Module, inputs: tuple) -> torch.Tensor:
    x, t, ctx, added = inputs
    with torch.no_grad():
        return unet(x, t, ctx, added_cond_kwargs=added).sample


def run_tes(model: TinySdxl) -> list[torch.Tensor]:
    ids = torch.tensor([[49406, 320, 1125, 539, 49407, 0, 0]])
    with torch.no_grad():
        return [model.te1(ids).last_hidden_state, model.te2(ids).last_hidden_state]


def randomize(net: nn.Module, seed: int = 3, std: float = 0.05) -> None:
    """Give every adapter factor a non-zero value so ΔW ≠ 0 (init makes ΔW exactly 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("scalar"):
                p.fill_(0.7)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)


def write_tiny_images(img_dir, n: int) -> None:
    """n 64×64 gradient PNGs with captions, for tiny trainer runs."""
    import numpy as np
    from PIL import Image

    img_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = np.clip(rng.random(3) * 255 + np.linspace(0, 80, 64)[None, :, None], 0, 255)
        Image.fromarray((arr + np.zeros((64, 64, 3))).astype(np.uint8)).save(img_dir / f"{i}.png")
        (img_dir / f"{i}.txt").write_text(f"a photo of sks thing{i}")
