"""Targeting and naming on SDXL (spec networks.md §2, sdxl.md §5): golden SGM names on the tiny model,
golden module and parameter counts on the real config (meta device)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from library.sdxl.config import SDXL_TE1_CONFIG, SDXL_TE2_CONFIG, SDXL_UNET_CONFIG
from networks import loha, lokr, lora
from networks.arch import detect_architecture
from networks.arch.sdxl import make_diffusers_to_sgm
from networks.lokr import full_w2_count
from tests.helpers.sdxl_network import build_tiny_sdxl

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def _golden(name: str) -> set[str]:
    return set((GOLDEN / name).read_text().split())


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_sdxl()


@pytest.fixture(scope="module")
def real_meta():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
        te1 = CLIPTextModel(CLIPTextConfig(**SDXL_TE1_CONFIG))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TE2_CONFIG))
    return unet, te1, te2


@pytest.mark.parametrize("module", [lora, loha, lokr])
def test_tiny_golden_names(tiny, module) -> None:
    base = _golden("sdxl_tiny_names.txt")
    net = module.create_network(1.0, 4, 1, None, tiny.tes, tiny.unet)
    assert {m.lora_name for m in net.all_loras} == base
    assert set(net.state_dict().keys()) == {k for k in net.file_state_dict()}  # state_dict keys = file keys
    conv = module.create_network(1.0, 4, 1, None, tiny.tes, tiny.unet, conv_dim="2")
    assert {m.lora_name for m in conv.all_loras} == base | _golden("sdxl_tiny_names_conv_extra.txt")


def test_sdxl_spec_examples_map_exactly() -> None:
    m = make_diffusers_to_sgm(2, {0, 1})
    assert m("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q") == (
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    )
    assert m("up_blocks.0.upsamplers.0.conv") == "output_blocks.2.2.conv"
    assert m("down_blocks.0.resnets.0.time_emb_proj") == "input_blocks.1.0.emb_layers.1"
    assert m("down_blocks.0.downsamplers.0.conv") == "input_blocks.3.0.op"
    assert m("up_blocks.0.resnets.0.conv_shortcut") == "output_blocks.0.0.skip_connection"
    assert m("mid_block.resnets.1.conv2") == "middle_block.2.out_layers.3"
    assert m("mid_block.attentions.0.proj_out") == "middle_block.1.proj_out"
    assert m("up_blocks.1.attentions.2.proj_in") == "output_blocks.5.1.proj_in"
    assert m("time_embedding.linear_2") == "time_embed.2"
    assert m("add_embedding.linear_1") == "label_emb.0.0"
    with pytest.raises(ValueError, match="no SGM equivalent"):
        m("something.else")


def _split(net) -> tuple[int, int, int]:
    lin = sum(1 for m in net.unet_loras if not m.is_conv)
    one = sum(1 for m in net.unet_loras if m.is_conv and not m.is_kxk)
    kxk = sum(1 for m in net.unet_loras if m.is_kxk)
    return lin, one, kxk


def _unet_params(net) -> int:
    return sum(p.numel() for m in net.unet_loras for p in m.parameters())


def test_real_sdxl_counts(real_meta) -> None:
    unet, te1, te2 = real_meta
    assert detect_architecture([te1, te2], unet).name == "sdxl"
    net = lora.create_network(1.0, 32, 16, None, [te1, te2], unet)
    assert len(net.unet_loras) == 722 and _split(net) == (722, 0, 0)
    assert [sum(1 for m in net.text_encoder_loras if m.te_index == i) for i in (0, 1)] == [72, 192]
    assert _unet_params(net) == 85_114_880
    names = {m.lora_name for m in net.all_loras}
    assert "lora_unet_middle_block_1_transformer_blocks_9_ff_net_0_proj" in names
    assert "lora_te2_text_model_encoder_layers_31_mlp_fc2" in names
    conv = lora.create_network(1.0, 32, 16, None, [te1, te2], unet, conv_dim=16)
    assert len(conv.unet_loras) == 788 and _split(conv) == (739, 11, 38)
    by_name = {m.lora_name: m for m in conv.unet_loras}
    assert tuple(by_name["lora_unet_input_blocks_1_0_in_layers_2"].lora_down.weight.shape) == (16, 320, 3, 3)
    assert by_name["lora_unet_output_blocks_0_0_skip_connection"].rank == 32
    assert by_name["lora_unet_input_blocks_1_0_emb_layers_1"].rank == 32


@pytest.mark.parametrize(
    "module,dim,kwargs,params,full",
    [
        (loha, 32, {}, 170_229_760, None),
        (lokr, 32, {}, 2_466_208, 592),
        (lokr, 32, {"conv_dim": 16}, 2_799_280, None),
        (lokr, 32, {"factor": 8, "full_matrix": True}, 34_542_208, 722),
        (lokr, 16, {"factor": 4}, 10_650_912, None),
    ],
)
def test_real_sdxl_golden_params(real_meta, module, dim, kwargs, params, full) -> None:
    unet, te1, te2 = real_meta
    net = module.create_network(1.0, dim, 16, None, None, unet, **kwargs)
    assert _unet_params(net) == params
    if full is not None:
        assert full_w2_count(net.unet_loras) == full


def test_lokr_full_switch_warns_once(real_meta, caplog) -> None:
    unet, _, _ = real_meta
    with caplog.at_level("WARNING"):
        lokr.create_network(1.0, 32, 16, None, None, unet)
    msgs = [r.getMessage() for r in caplog.records if "full W2" in r.getMessage()]
    assert msgs == [
        "LoKr: 592 of 722 modules use a full W2 (r ≥ max(b,d)/2 at factor -1); α is ignored there (scale 1)"
    ]


def test_text_encoder_only_and_detection_errors(tiny) -> None:
    net = loha.create_network(1.0, 4, 1, None, tiny.tes, None)
    assert len(net.unet_loras) == 0 and len(net.text_encoder_loras) == 36
    # one module instead of a list is TE 1; a None entry is skipped but keeps TE 2's prefix
    one = loha.create_network(1.0, 4, 1, None, tiny.te1, tiny.unet)
    assert {m.lora_name.split("_text_model")[0] for m in one.text_encoder_loras} == {"lora_te1"}
    second = loha.create_network(1.0, 4, 1, None, [None, tiny.te2], None)
    assert {m.lora_name.split("_text_model")[0] for m in second.text_encoder_loras} == {"lora_te2"}
    assert len(one.text_encoder_loras) == len(second.text_encoder_loras) == 18
    with pytest.raises(ValueError, match="unet: model class Linear"):
        loha.create_network(1.0, 4, 1, None, None, nn.Linear(2, 2))
    with pytest.raises(ValueError, match="text_encoder: 3 text encoders"):
        loha.create_network(1.0, 4, 1, None, [tiny.te1, tiny.te2, tiny.te1], tiny.unet)
    with pytest.raises(ValueError, match="text_encoder and unet"):
        loha.create_network(1.0, 4, 1, None, None, None)


def test_verbose_prints_table(tiny, capsys) -> None:
    net = lokr.create_network(
        1.0, 4, 2, None, tiny.tes, tiny.unet, verbose="true", conv_dim=2, exclude_patterns="[r'.*attn2.*']"
    )
    out = capsys.readouterr().out
    # one row per module: name, shape, layout, rank, alpha, scale, params (mixed scales visible)
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("lora_")}
    assert len(rows) == len(net.all_loras)
    for m in net.all_loras:
        row = rows[m.lora_name]
        cells = row.split()
        assert cells[1] == "x".join(map(str, m.layer_shape)) and m.layout() in row
        assert cells[-1] == f"{sum(p.numel() for p in m.parameters()):,}"
        if m.lokr_layout.both_full:  # α = 2 was passed; the full-W2 rule ignores it (s = 1), and says so
            assert "α ignored (full W2)" in row and float(cells[-2]) == m.scale == 1.0
            assert int(cells[-7]) == m.rank
            continue
        assert (int(cells[-4]), float(cells[-3]), float(cells[-2])) == pytest.approx(
            (m.rank, m.alpha_value, m.scale)
        )
    assert {float(r.split()[-2]) for r in rows.values()} >= {1.0, 0.5}  # full W2 at s = 1, low-rank at α/r
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_0_proj" in out
    assert "excluded: lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_q" in out
    assert "⊗" in out and "scale" in out


def test_compiled_unet_is_unwrapped(tiny) -> None:
    compiled = torch.compile(tiny.unet)  # wrapping only; nothing is compiled until called
    net = loha.create_network(1.0, 4, 1, None, tiny.tes, compiled)
    assert {m.lora_name for m in net.all_loras} == _golden("sdxl_tiny_names.txt")


def test_applied_log_says_which_created_modules_are_left_out(tiny, caplog) -> None:
    """U-Net-only training: the create line counts the text-encoder modules, the applied line says why
    none of them is applied (it used to read as a contradiction: 14 created, 0 applied)."""
    net = lokr.create_network(1.0, 4, 2, None, tiny.tes, tiny.unet)
    n_te = len(net.text_encoder_loras)
    assert n_te > 0
    with caplog.at_level("INFO", logger="networks.network_base"):
        net.apply_to(tiny.tes, tiny.unet, apply_text_encoder=False, apply_unet=True)
    line = next(r.getMessage() for r in caplog.records if "network applied" in r.getMessage())
    assert f"0 text-encoder modules, {len(net.unet_loras)} unet modules" in line
    assert f"({n_te} created modules left out: the text encoder is not trained)" in line
    net.remove_from()
