"""Interop with lycoris-lora 4.1.3 (test oracle only): our files load there with the same ΔW, and
LyCORIS-written files (decompose_both, 4-D 1×1 `lokr_w2`, baked σ) load in ours with the same ΔW.

LyCORIS names modules from `named_modules()` paths, so both sides use a small SGM-layout U-Net
(the class and attribute names of sd-scripts' model) and the real-layout CLIP-bigG TE2. ΔW on the
LyCORIS side is `get_weight(shape) · scalar` (its `get_diff_weight` applies α/r twice, spec §5 #12).
"""

from __future__ import annotations

import logging

import pytest
import torch
from lycoris import kohya as lyco_kohya
from safetensors.torch import load_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from library.sdxl.config import tiny_sdxl_configs
from networks import loha, lokr, lora


class Attention(nn.Module):
    def __init__(self, c: int, ctx: int) -> None:
        super().__init__()
        self.to_q = nn.Linear(c, c, bias=False)
        self.to_k = nn.Linear(ctx, c, bias=False)
        self.to_v = nn.Linear(ctx, c, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(c, c), nn.Dropout(0.0)])


class FeedForward(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        proj = nn.Module()
        proj.proj = nn.Linear(c, 8 * c)
        self.net = nn.ModuleList([proj, nn.Dropout(0.0), nn.Linear(4 * c, c)])


class BasicTransformerBlock(nn.Module):
    def __init__(self, c: int, ctx: int) -> None:
        super().__init__()
        self.attn1 = Attention(c, c)
        self.attn2 = Attention(c, ctx)
        self.ff = FeedForward(c)


class Transformer2DModel(nn.Module):
    def __init__(self, c: int, ctx: int) -> None:
        super().__init__()
        self.proj_in = nn.Linear(c, c)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(c, ctx)])
        self.proj_out = nn.Linear(c, c)


class ResnetBlock2D(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(4, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, cout))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(4, cout), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(cout, cout, 3, padding=1)
        )
        self.skip_connection = nn.Conv2d(cin, cout, 1)


class Downsample2D(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(c, c, 3, stride=2, padding=1)


class SdxlUNet2DConditionModel(nn.Module):
    """A few SGM-layout blocks with sd-scripts' class names (enough for every adapter layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(16, 32)))
        self.input_blocks = nn.ModuleList(
            [
                nn.ModuleList([nn.Conv2d(4, 32, 3, padding=1)]),
                nn.ModuleList([ResnetBlock2D(32, 64, 32), Transformer2DModel(64, 48)]),
                nn.ModuleList([Downsample2D(64)]),
            ]
        )
        self.middle_block = nn.ModuleList([ResnetBlock2D(64, 64, 32), Transformer2DModel(64, 48)])
        self.output_blocks = nn.ModuleList()


def _models():
    torch.manual_seed(0)
    unet = SdxlUNet2DConditionModel().double()
    cfg = tiny_sdxl_configs()["text_encoder_2"]
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg)).double()
    return unet, te2


def _lyco_modules(net) -> dict[str, nn.Module]:
    return {m.lora_name: m for m in net.unet_loras + net.text_encoder_loras}


def _lyco_delta(m) -> torch.Tensor:
    if hasattr(m, "get_weight"):  # LoHa / LoKr: get_weight carries s once
        return m.get_weight(m.shape) * m.scalar
    return m.get_diff_weight(1)[0]  # LoCon: make_weight has no s, get_diff_weight adds it once


def _our_delta(m) -> torch.Tensor:
    return m.delta_weight_scaled(m.total_scale(1.0)).detach().reshape(m.layer_shape)


def _randomize(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            if p.dim() > 0:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.1)


OURS = [
    (loha, 4, {"conv_dim": 3, "conv_alpha": 2}),
    (loha, 2, {"conv_dim": 3, "use_tucker": True}),  # Tucker cores t1/t2 on the k×k convs
    (lokr, 2, {"conv_dim": 2, "conv_alpha": 5}),
    (lokr, 2, {"factor": 4, "decompose_both": True}),
    # mostly full W2 (both full: s = 1, α = r). Not with conv_dim: a full W2 of a 1×1 conv is written
    # 2-D as the spec requires, a form LyCORIS 4.1.3 cannot read (it wants (b, d, 1, 1)).
    (lokr, 8, {}),
    (lora, 4, {"conv_dim": 2}),
]


@pytest.mark.parametrize("module,dim,kwargs", OURS, ids=[f"{m.__name__}-{d}-{k}" for m, d, k in OURS])
def test_our_files_load_in_lycoris_with_same_delta(tmp_path, module, dim, kwargs) -> None:
    unet, te2 = _models()
    net = module.create_network(1.0, dim, 3, None, [nn.Module(), te2], unet, **kwargs)
    net.to(torch.float64)
    _randomize([p for n, p in net.named_parameters()], seed=1)
    path = tmp_path / "ours.safetensors"
    net.save_weights(str(path), None, {"ss_network_module": module.__name__})
    logging.getLogger("lycoris").setLevel(logging.ERROR)
    lnet, _ = lyco_kohya.create_network_from_weights(1.0, str(path), None, [nn.Module(), te2], unet)
    lnet.load_state_dict(load_file(str(path)), strict=False)
    lmods = _lyco_modules(lnet)
    ours = {m.lora_name: m for m in net.all_loras}
    assert set(lmods) == set(ours)
    layouts = set()
    for name, m in ours.items():
        lm = lmods[name].double()
        want = _our_delta(m)
        got = _lyco_delta(lm).reshape(want.shape)
        assert want.abs().max() > 0
        assert (got - want).abs().max() <= 1e-6 * want.abs().max(), name
        layouts.add(m.layout().split(" (")[0] if module is not lokr else m.layout())
    assert len(layouts) >= 2  # several layouts were exercised
    if kwargs.get("use_tucker"):
        assert "loha tucker" in layouts


LYCO = [
    ("lokr", 2, {"decompose_both": True, "factor": 4}),
    ("lokr", 16, {}),  # full W2 everywhere, 4-D (b, d, 1, 1) on the 1×1 skip conv
    ("lokr", 2, {"use_scalar": True}),
    ("loha", 4, {"use_scalar": True}),
    ("locon", 2, {"conv_dim": 2, "use_tucker": True}),  # LoCon-Tucker lora_mid on the k×k convs
]


@pytest.mark.parametrize("algo,dim,kwargs", LYCO, ids=[f"{a}-{d}-{k}" for a, d, k in LYCO])
def test_lycoris_files_load_in_ours_with_same_delta(tmp_path, algo, dim, kwargs) -> None:
    unet, te2 = _models()
    logging.getLogger("lycoris").setLevel(logging.ERROR)
    tes = [nn.Module(), te2]
    lnet = lyco_kohya.create_network(1.0, dim, 3, None, tes, unet, algo=algo, **kwargs)
    lnet.apply_to(tes, unet, True, True)  # LyCORIS registers its modules (and state_dict) here
    lnet.to(torch.float64)
    _randomize(list(lnet.parameters()), seed=2)
    path = tmp_path / "lyco.safetensors"
    lnet.save_weights(str(path), None, None)
    sd = load_file(str(path))
    if dim == 16:
        assert sd["lora_unet_input_blocks_1_0_skip_connection.lokr_w2"].dim() == 4
    if algo == "locon":
        assert any(k.endswith(".lora_mid.weight") for k in sd)
    module = {"lokr": lokr, "loha": loha, "locon": lora}[algo]
    net, _ = module.create_network_from_weights(1.0, str(path), None, [nn.Module(), te2], unet)
    net.to(torch.float64)
    net.load_weights(str(path))
    # gen_img's path: apply_to + non-strict load_state_dict of the raw file dict
    net_sd, _ = module.create_network_from_weights(1.0, None, None, [nn.Module(), te2], unet, weights_sd=sd)
    net_sd.to(torch.float64)
    result = net_sd.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys and not result.missing_keys
    lmods = _lyco_modules(lnet)
    assert {m.lora_name for m in net.all_loras} == set(lmods)
    by_name = {m.lora_name: m for m in net_sd.all_loras}
    for m in net.all_loras:
        want = _lyco_delta(lmods[m.lora_name]).detach().reshape(m.layer_shape)
        for ours in (m, by_name[m.lora_name]):
            got = _our_delta(ours)
            assert (got - want).abs().max() <= 1e-6 * max(float(want.abs().max()), 1e-30), m.lora_name
