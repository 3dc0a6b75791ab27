"""LoRA ΔW vs explicit matmul/einsum references, and apply_weight vs the layers' own forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from networks.functional import apply_weight, lora_delta_weight

F64 = torch.float64


def _rand(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, dtype=F64, generator=gen)


def test_lora_linear() -> None:
    gen = torch.Generator().manual_seed(20)
    down, up = _rand(4, 10, gen=gen), _rand(12, 4, gen=gen)
    s = 7.0 / 4  # alpha != rank
    got = lora_delta_weight(down, up, s)
    ref = torch.einsum("or,ri->oi", up, down) * s
    assert got.shape == (12, 10)
    assert (got - ref).abs().max().item() <= 1e-12
    assert got[3, 7].item() == pytest.approx(s * sum(up[3, p].item() * down[p, 7].item() for p in range(4)))


def test_lora_conv_3x3_and_1x1() -> None:
    gen = torch.Generator().manual_seed(21)
    down, up = _rand(4, 6, 3, 3, gen=gen), _rand(8, 4, 1, 1, gen=gen)
    s = 0.3
    got = lora_delta_weight(down, up, s)
    ref = torch.einsum("or,rixy->oixy", up[:, :, 0, 0], down) * s
    assert got.shape == (8, 6, 3, 3)
    assert (got - ref).abs().max().item() <= 1e-12
    got1 = lora_delta_weight(down[:, :, :1, :1], up, s)
    assert got1.shape == (8, 6, 1, 1)
    ref1 = s * torch.einsum("or,ri->oi", up[:, :, 0, 0], down[:, :, 0, 0])[:, :, None, None]
    assert (got1 - ref1).abs().max().item() <= 1e-12
    # 2-D down with a 4-D up (1×1 conv stored mixed) still gives a 4-D ΔW
    assert lora_delta_weight(down[:, :, 0, 0], up, s).shape == (8, 6, 1, 1)


def test_lora_tucker_mid() -> None:
    gen = torch.Generator().manual_seed(22)
    down, mid, up = _rand(3, 5, 1, 1, gen=gen), _rand(3, 3, 3, 3, gen=gen), _rand(7, 3, 1, 1, gen=gen)
    got = lora_delta_weight(down, up, 1.5, mid=mid)
    ref = 1.5 * torch.einsum("op,pqxy,qi->oixy", up[:, :, 0, 0], mid, down[:, :, 0, 0])
    assert got.shape == (7, 5, 3, 3)
    assert (got - ref).abs().max().item() <= 1e-12


def test_lora_bad_shapes() -> None:
    gen = torch.Generator().manual_seed(23)
    with pytest.raises(ValueError, match="up of shape"):
        lora_delta_weight(_rand(4, 10, gen=gen), _rand(12, 3, gen=gen), 1.0)
    with pytest.raises(ValueError, match="mid of shape"):
        lora_delta_weight(_rand(4, 10, gen=gen), _rand(12, 4, gen=gen), 1.0, mid=_rand(3, 3, 3, 3, gen=gen))


def test_apply_weight_linear() -> None:
    torch.manual_seed(24)
    layer = nn.Linear(6, 5, bias=True).double()
    x = torch.randn(2, 3, 6, dtype=F64)
    got = apply_weight(x, layer.weight, layer)
    assert (got - (layer(x) - layer.bias)).abs().max().item() <= 1e-12
    assert (apply_weight(x, layer.weight[:, :, None, None], layer) - got).abs().max().item() == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=3, padding=2, dilation=2),
        dict(kernel_size=3, padding=1, padding_mode="reflect"),
        dict(kernel_size=1),
        dict(kernel_size=3, padding=1, groups=2),
    ],
)
def test_apply_weight_conv_matches_module(kwargs: dict) -> None:
    torch.manual_seed(25)
    layer = nn.Conv2d(4, 6, bias=True, **kwargs).double()
    x = torch.randn(2, 4, 9, 9, dtype=F64)
    got = apply_weight(x, layer.weight, layer)
    ref = layer(x) - layer.bias[None, :, None, None]
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-12
    if layer.kernel_size == (1, 1):  # a 2-D (O, I) weight is taken as a 1×1 kernel
        assert (apply_weight(x, layer.weight[:, :, 0, 0], layer) - ref).abs().max().item() <= 1e-12


def test_apply_weight_errors() -> None:
    x = torch.randn(2, 4)
    with pytest.raises(TypeError, match="nn.Linear or nn.Conv2d"):
        apply_weight(x, torch.randn(3, 4), nn.Conv1d(4, 3, 1))
    with pytest.raises(ValueError, match="Linear"):
        apply_weight(x, torch.randn(3, 4, 3, 3), nn.Linear(4, 3))
