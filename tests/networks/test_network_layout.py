"""Per-module layouts, shapes and init of spec networks.md §3.2–§3.4 (checklist #8): the LoKr full-W2
switch and `decompose_both` at their r = max/2 boundaries, Tucker only for low-rank k×k W2, factor shapes
and parameter counts per mode, and which factor starts at zero (with and without `use_scalar`)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from networks.loha import LoHaModule
from networks.lokr import LoKrModule, plan_lokr
from networks.lora import LoRAModule


@pytest.mark.parametrize(
    "out_dim,in_dim,factor,rank,w2",
    [
        # 1280 → (32, 40) at f −1: max(b, d) = 40, so the switch is at r = 20
        (1280, 1280, -1, 19, "lowrank"),
        (1280, 1280, -1, 20, "full"),
        # 640×320 at f 8 → b = 80, d = 40: max = 80, switch at r = 40
        (640, 320, 8, 39, "lowrank"),
        (640, 320, 8, 40, "full"),
        # odd max: 127 → (1, 127), switch at r ≥ 63.5
        (127, 127, -1, 63, "lowrank"),
        (127, 127, -1, 64, "full"),
    ],
)
def test_full_w2_switch_boundary(out_dim, in_dim, factor, rank, w2) -> None:
    L = plan_lokr(out_dim, in_dim, (1, 1), rank, factor)
    assert L.w2_mode == w2
    assert L.w1_rank is None and L.rank == rank
    assert L.both_full == (w2 == "full")


@pytest.mark.parametrize("rank,w1_low", [(3, True), (4, False)])
def test_decompose_both_boundary(rank, w1_low) -> None:
    # 320 at f 8 → W1 is (8, 8): max(a, c)/2 = 4, so W1 is low-rank only for r < 4
    L = plan_lokr(320, 320, (1, 1), rank, 8, decompose_both=True)
    assert (L.w1_rank == rank) if w1_low else (L.w1_rank is None)
    assert L.w2_mode == "lowrank"  # max(b, d)/2 = 20 > r
    assert not plan_lokr(320, 320, (1, 1), rank, 8).w1_rank  # without the flag W1 is always full


def test_tucker_only_for_low_rank_kxk_and_full_matrix_forces_full() -> None:
    assert plan_lokr(320, 320, (3, 3), 4, 8, use_tucker=True).w2_mode == "tucker"
    assert plan_lokr(320, 320, (1, 1), 4, 8, use_tucker=True).w2_mode == "lowrank"  # 1×1 is linear-like
    assert plan_lokr(320, 320, (3, 3), 20, 8, use_tucker=True).w2_mode == "full"  # r ≥ 40/2
    assert plan_lokr(320, 320, (3, 3), 4, 8).w2_mode == "lowrank"
    assert plan_lokr(320, 320, (1, 1), 4, 8, full_matrix=True).w2_mode == "full"


def _shapes(m: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in m.named_parameters()}


def _leaf(kernel: int, o: int = 64, i: int = 48) -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(i, o) if kernel == 0 else nn.Conv2d(i, o, kernel, padding=kernel // 2)


def test_loha_shapes_and_params_per_mode() -> None:
    r, o, i = 4, 64, 48
    lin = LoHaModule("lin", _leaf(0), 1.0, r, 2.0)
    assert _shapes(lin) == {
        "hada_w1_a": (o, r),
        "hada_w1_b": (r, i),
        "hada_w2_a": (o, r),
        "hada_w2_b": (r, i),
    }
    flat = LoHaModule("flat", _leaf(3), 1.0, r, 2.0)
    assert _shapes(flat)["hada_w1_b"] == (r, i * 9) and not flat.tucker
    assert flat.describe()["params"] == 2 * r * (o + i * 9)
    tucker = LoHaModule("tucker", _leaf(3), 1.0, r, 2.0, use_tucker=True)
    assert _shapes(tucker) == {
        "hada_w1_a": (r, o),
        "hada_w1_b": (r, i),
        "hada_w2_a": (r, o),
        "hada_w2_b": (r, i),
        "hada_t1": (r, r, 3, 3),
        "hada_t2": (r, r, 3, 3),
    }
    assert tucker.describe()["params"] == 2 * (r * (o + i) + r * r * 9)
    assert not LoHaModule("one", _leaf(1), 1.0, r, 2.0, use_tucker=True).tucker  # 1×1: no Tucker core
    assert (lin.scale, float(lin.alpha)) == (0.5, 2.0)


def test_lokr_shapes_and_scale_per_mode() -> None:
    # 64 → (8, 8), 48 → (6, 8) at f −1; r = 2 < max(b, d)/2 = 4 → low-rank W2
    o, i = 64, 48
    low = LoKrModule("low", _leaf(3), 1.0, plan_lokr(o, i, (3, 3), 2), 3.0)
    assert _shapes(low) == {"lokr_w1": (8, 6), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8 * 9)}
    assert low.scale == 1.5
    tucker = LoKrModule("tucker", _leaf(3), 1.0, plan_lokr(o, i, (3, 3), 2, use_tucker=True), 3.0)
    assert _shapes(tucker) == {
        "lokr_w1": (8, 6),
        "lokr_t2": (2, 2, 3, 3),
        "lokr_w2_a": (2, 8),
        "lokr_w2_b": (2, 8),
    }
    assert tucker.describe()["params"] == 8 * 6 + 2 * (8 + 8) + 4 * 9
    full_conv = LoKrModule("fc", _leaf(3), 1.0, plan_lokr(o, i, (3, 3), 4), 3.0)
    assert _shapes(full_conv) == {"lokr_w1": (8, 6), "lokr_w2": (8, 8, 3, 3)}
    full_1x1 = LoKrModule("f1", _leaf(1), 1.0, plan_lokr(o, i, (1, 1), 4), 3.0)
    assert _shapes(full_1x1)["lokr_w2"] == (8, 8)  # 2-D for 1×1 (LyCORIS writes 4-D; we read both)
    # both full: α is ignored, s = 1 and the saved α is the rank
    assert (full_1x1.scale, full_1x1.alpha_value, float(full_1x1.file_tensors()["alpha"])) == (1.0, 4.0, 4.0)
    both_low = LoKrModule("bl", _leaf(0), 1.0, plan_lokr(o, i, (1, 1), 2, 8, decompose_both=True), 3.0)
    assert _shapes(both_low) == {
        "lokr_w1_a": (8, 2),
        "lokr_w1_b": (2, 6),
        "lokr_w2_a": (8, 2),
        "lokr_w2_b": (2, 8),
    }
    # W1 low-rank, W2 full (only reachable with full_matrix, since a ≤ b and c ≤ d): s = α/r still applies
    layout = plan_lokr(256, 256, (1, 1), 2, 16, decompose_both=True, full_matrix=True)
    w1_low_only = LoKrModule("w1", _leaf(0, 256, 256), 1.0, layout, 3.0)
    assert w1_low_only.lokr_layout.w2_mode == "full" and w1_low_only.lokr_layout.w1_rank == 2
    assert w1_low_only.scale == 1.5


def _is_zero(t: torch.Tensor) -> bool:
    return bool((t == 0).all())


@pytest.mark.parametrize("kernel,tucker", [(0, False), (3, False), (3, True)])
@pytest.mark.parametrize("use_scalar", [False, True])
def test_loha_init_zeroes_w2_a_in_every_mode(kernel, tucker, use_scalar) -> None:
    torch.manual_seed(1)
    m = LoHaModule("m", _leaf(kernel, 256, 256), 1.0, 8, 4.0, use_tucker=tucker, use_scalar=use_scalar)
    assert m.tucker == tucker
    # LyCORIS init in every mode (not [SB]'s Tucker init, which zeroes w1_a and so boosts a live factor)
    assert _is_zero(m.hada_w2_a) != use_scalar
    assert float(m.hada_w1_a.detach().std()) == pytest.approx(0.1, rel=0.15)
    assert float(m.hada_w1_b.detach().std()) == pytest.approx(1.0, rel=0.15)
    assert float(m.hada_w2_b.detach().std()) == pytest.approx(1.0, rel=0.15)
    if use_scalar:
        assert float(m.hada_w2_a.detach().std()) == pytest.approx(0.1, rel=0.15)
        assert m.scalar is not None and float(m.scalar.detach()) == 0.0
    if tucker:
        assert float(m.hada_t1.detach().std()) == pytest.approx(0.1, rel=0.3)
    assert _is_zero(m.delta_weight())


@pytest.mark.parametrize(
    "kernel,kw,zero",
    [
        (0, {}, "lokr_w2_b"),
        (0, {"full_matrix": True}, "lokr_w2"),
        (3, {"use_tucker": True}, "lokr_w2_b"),
        (0, {"decompose_both": True}, "lokr_w2_b"),
    ],
)
@pytest.mark.parametrize("use_scalar", [False, True])
def test_lokr_init_zero_factor_and_kaiming(kernel, kw, zero, use_scalar) -> None:
    torch.manual_seed(2)
    leaf = _leaf(kernel, 256, 256)
    layout = plan_lokr(256, 256, (kernel, kernel) if kernel else (1, 1), 2, 4, **kw)
    m = LoKrModule("m", leaf, 1.0, layout, 1.0, use_scalar=use_scalar)
    assert _is_zero(getattr(m, zero)) != use_scalar
    for name, p in m.named_parameters():
        if name == "scalar" or (name == zero and not use_scalar):
            continue
        fan_in = p[0].numel()  # kaiming-uniform(a=√5): U(±1/√fan_in)
        bound = 1 / math.sqrt(fan_in)
        assert float(p.detach().abs().max()) <= bound and float(p.detach().abs().max()) > 0.5 * bound, name
    assert (m.scalar is not None) == use_scalar and (m.scalar is None or float(m.scalar.detach()) == 0.0)
    assert _is_zero(m.delta_weight())


def test_lora_init_zero_up() -> None:
    m = LoRAModule("m", _leaf(0, 256, 256), 1.0, 8, 4.0)
    assert _is_zero(m.lora_up.weight) and not _is_zero(m.lora_down.weight)
    s = LoRAModule("s", _leaf(0, 256, 256), 1.0, 8, 4.0, use_scalar=True)
    assert not _is_zero(s.lora_up.weight) and float(s.scalar.detach()) == 0.0 and _is_zero(s.delta_weight())


@pytest.mark.parametrize("stride,padding,mode", [(1, 1, "zeros"), (2, 1, "zeros"), (1, 1, "reflect")])
def test_lora_tucker_file_forward_equals_its_delta(stride, padding, mode) -> None:
    # LoCon-Tucker files (LyCORIS use_tucker): down 1×1 → k×k core with the layer's stride/padding → up 1×1
    torch.manual_seed(3)
    conv = nn.Conv2d(6, 10, 3, stride=stride, padding=padding, padding_mode=mode).double()
    r = 3
    t = {
        "lora_down.weight": torch.randn(r, 6, 1, 1, dtype=torch.float64),
        "lora_mid.weight": torch.randn(r, r, 3, 3, dtype=torch.float64),
        "lora_up.weight": torch.randn(10, r, 1, 1, dtype=torch.float64),
        "alpha": torch.tensor(1.5),
    }
    from networks.network_args import NetworkArgs

    m = LoRAModule.from_tensors("lora_unet_c", conv, t, 0.8, NetworkArgs(algo="lora")).double()
    m.load_file_tensors(t)
    assert m.tucker and m.layout() == "lora tucker" and m.scale == 0.5
    want = torch.einsum(
        "op,pqxy,qi->oixy",
        t["lora_up.weight"][:, :, 0, 0],
        t["lora_mid.weight"],
        t["lora_down.weight"][:, :, 0, 0],
    )
    assert torch.allclose(m.delta_weight_scaled(1.0), want, rtol=1e-12, atol=1e-12)
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    dconv = nn.Conv2d(6, 10, 3, stride=stride, padding=padding, padding_mode=mode, bias=False).double()
    with torch.no_grad():
        dconv.weight.copy_(want * 0.5 * 0.8)
    got = m(x) - conv(x)
    assert torch.allclose(got, dconv(x), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="lora_unet_l.lora_mid.weight"):
        LoRAModule.from_tensors("lora_unet_l", nn.Linear(6, 10), t, 1.0, NetworkArgs(algo="lora"))


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_file_alpha_missing_or_zero_means_scale_one(algo, caplog) -> None:
    from networks.network_args import NetworkArgs

    cls = {"loha": LoHaModule, "lokr": LoKrModule}[algo]
    leaf = _leaf(0, 64, 48)
    src = (
        LoHaModule("lora_unet_x", leaf, 1.0, 4, 2.0)
        if algo == "loha"
        else LoKrModule("lora_unet_x", leaf, 1.0, plan_lokr(64, 48, (1, 1), 2, 4), 3.0)
    )
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    t = src.file_tensors()
    assert src.scale != 1.0
    for alpha in (None, torch.tensor(0.0)):
        tensors = {k: v for k, v in t.items() if k != "alpha"}
        if alpha is not None:
            tensors["alpha"] = alpha
        m = cls.from_tensors("lora_unet_x", leaf, tensors, 1.0, NetworkArgs(algo=algo))
        m.load_file_tensors(tensors)
        assert (
            m.scale == 1.0 and m.alpha_value == float(m.rank) and float(m.file_tensors()["alpha"]) == m.rank
        )
        assert torch.allclose(m.delta_weight_scaled(1.0), src.delta_weight_scaled(1.0))
        assert torch.allclose(m.delta_weight(), src.delta_weight() / src.scale)
    assert "lora_unet_x.alpha is 0" in caplog.text
