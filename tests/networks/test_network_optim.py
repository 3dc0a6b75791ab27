"""Optimizer groups (spec networks.md §1.6): TE1/TE2/U-Net × network_reg_lrs × LoRA+, lr 0 → frozen and
dropped, exact descriptions, `get_trainable_params` = grouped params, plus params per algorithm."""

from __future__ import annotations

import pytest

from networks import loha, lokr, lora
from tests.helpers.sdxl_network import build_tiny_sdxl


@pytest.fixture(scope="module")
def model():
    return build_tiny_sdxl()


def _names(net, group) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {f"{m.lora_name}.{n}" for m in net.all_loras for n, p in m.named_parameters() if id(p) in ids}


def test_groups_sides_reg_lrs_and_plus(model) -> None:
    net = loha.create_network(
        1.0,
        4,
        2,
        None,
        model.tes,
        model.unet,
        network_reg_lrs=r".*ff\.net.*=3e-4,text_model\.encoder\.layers\.0\..*=7e-5",
        loraplus_lr_ratio="4",
        loraplus_unet_lr_ratio="16",
    )
    groups, descs = net.prepare_optimizer_params_with_multiple_te_lrs([1e-5, 2e-5], 1e-4, 1e-3)
    assert descs == [
        "textencoder 1 reg_lr_1",
        "textencoder 1 reg_lr_1 plus",
        "textencoder 1",
        "textencoder 1 plus",
        "textencoder 2 reg_lr_1",
        "textencoder 2 reg_lr_1 plus",
        "textencoder 2",
        "textencoder 2 plus",
        "unet reg_lr_0",
        "unet reg_lr_0 plus",
        "unet",
        "unet plus",
    ]
    lrs = [g["lr"] for g in groups]
    assert lrs == pytest.approx(
        [7e-5, 2.8e-4, 1e-5, 4e-5, 7e-5, 2.8e-4, 2e-5, 8e-5, 3e-4, 4.8e-3, 1e-4, 1.6e-3]
    )
    for g, d in zip(groups, descs):
        names = _names(net, g)
        assert names
        if d.endswith("plus"):
            assert all(n.endswith(".hada_w2_a") for n in names)
        else:
            assert not any(n.endswith(".hada_w2_a") for n in names)
        if d.startswith("unet reg_lr_0"):
            assert all("_ff_net_" in n for n in names)
        if d.startswith("textencoder 2 reg_lr_1"):
            assert all(n.startswith("lora_te2_text_model_encoder_layers_0_") for n in names)
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len(set(map(id, grouped))) == len(list(net.parameters()))
    assert [id(p) for p in net.get_trainable_params()] == [id(p) for p in grouped]


@pytest.mark.parametrize(
    "module,kwargs,plus_suffixes",
    [
        (lokr, {"factor": "4"}, {".lokr_w1"}),
        (lokr, {"decompose_both": "true"}, {".lokr_w1_a", ".lokr_w1_b", ".lokr_w1"}),
        (lora, {}, {".lora_up.weight"}),
        (loha, {"use_scalar": "true"}, {".hada_w2_a"}),
    ],
)
def test_plus_params_per_algorithm(model, module, kwargs, plus_suffixes) -> None:
    dim = 2 if kwargs.get("decompose_both") else 4  # r < max(a, c)/2 needs a small rank on 64-wide layers
    net = module.create_network(1.0, dim, 2, None, model.tes, model.unet, loraplus_lr_ratio=2, **kwargs)
    groups, descs = net.prepare_optimizer_params(None, None, 1e-4)
    assert descs == [
        "textencoder 1",
        "textencoder 1 plus",
        "textencoder 2",
        "textencoder 2 plus",
        "unet",
        "unet plus",
    ]
    for g, d in zip(groups, descs):
        names = _names(net, g)
        is_plus = {any(n.endswith(s) for s in plus_suffixes) for n in names}
        assert is_plus == ({True} if d.endswith("plus") else {False}), d
        if d.endswith("plus"):
            assert g["lr"] == pytest.approx(2e-4)
    if kwargs.get("decompose_both"):
        plus_names = _names(net, groups[-1])
        assert any(n.endswith(".lokr_w1_a") for n in plus_names) and any(
            n.endswith(".lokr_w1_b") for n in plus_names
        )
    if kwargs.get("use_scalar"):
        assert not any(n.endswith(".scalar") for n in _names(net, groups[-1]))  # σ is never plus


def test_lr_zero_freezes_and_drops(model) -> None:
    net = lokr.create_network(1.0, 4, 2, None, model.tes, model.unet, network_reg_lrs=r".*attn1.*=0")
    groups, descs = net.prepare_optimizer_params_with_multiple_te_lrs([0.0, 5e-5], 1e-4, 1e-3)
    assert descs == ["textencoder 2", "unet"]
    assert groups[0]["lr"] == 5e-5 and groups[1]["lr"] == 1e-4
    trainable = {id(p) for p in net.get_trainable_params()}
    for m in net.all_loras:
        frozen = m.te_index == 0 or "attn1" in m.original_name
        for p in m.parameters():
            assert p.requires_grad == (not frozen)
            assert (id(p) in trainable) == (not frozen)
    net.prepare_grad_etc(model.tes, model.unet)
    assert sum(p.requires_grad for p in net.parameters()) == len(trainable)


def test_te_lr_fallbacks(model) -> None:
    net = lora.create_network(1.0, 4, 2, None, model.tes, model.unet)
    for te_lr, want in (
        ([3e-5], [3e-5, 3e-5]),
        (4e-5, [4e-5, 4e-5]),
        (None, [1e-3, 1e-3]),
        ([], [1e-3, 1e-3]),
    ):
        groups, descs = net.prepare_optimizer_params_with_multiple_te_lrs(te_lr, None, 1e-3)
        assert descs == ["textencoder 1", "textencoder 2", "unet"]
        assert [g["lr"] for g in groups] == pytest.approx([*want, 1e-3])


def test_loraplus_side_ratio_falls_back_to_global(model) -> None:
    net = loha.create_network(
        1.0, 4, 2, None, model.tes, model.unet, loraplus_text_encoder_lr_ratio="3", loraplus_lr_ratio="0"
    )
    groups, descs = net.prepare_optimizer_params(1e-5, 1e-4, 1e-3)
    assert descs == ["textencoder 1", "textencoder 1 plus", "textencoder 2", "textencoder 2 plus", "unet"]
    assert groups[1]["lr"] == pytest.approx(3e-5)
