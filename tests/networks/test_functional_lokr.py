"""LoKr ΔW vs the lycoris-lora 4.1.3 oracle (kron_weight with an explicit scale) and the W1/W2 builders."""

from __future__ import annotations

import pytest
import torch
from lycoris.functional import lokr as lyco_lokr

from networks.functional import lokr_delta_weight, make_w1, make_w2

F64 = torch.float64
OUT, IN, R = 12, 10, 3  # O = 3·4 (a, b), I = 2·5 (c, d) at factor −1
A, B, C, D = 3, 4, 2, 5


def _rand(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, dtype=F64, generator=gen)


def _layout(w1_mode: str, w2_mode: str, kernel: tuple[int, int] | None, gen: torch.Generator):
    """Our factors and the oracle's (LyCORIS stores conv factors 4-D; we store low-rank w2_b flat)."""
    k = kernel or (1, 1)
    kk = k[0] * k[1]
    ours: dict[str, torch.Tensor | None] = dict.fromkeys(["w1", "w1a", "w1b", "w2", "w2a", "w2b", "t2"])
    if w1_mode == "full":
        ours["w1"] = _rand(A, C, gen=gen)
    else:
        ours["w1a"], ours["w1b"] = _rand(A, R, gen=gen), _rand(R, C, gen=gen)
    oracle = dict(ours)
    if w2_mode == "full":
        if kernel is None or k == (1, 1):
            ours["w2"] = _rand(B, D, gen=gen)
            oracle["w2"] = ours["w2"] if kernel is None else ours["w2"][:, :, None, None]
        else:
            ours["w2"] = oracle["w2"] = _rand(B, D, *k, gen=gen)
    elif w2_mode == "lowrank":
        ours["w2a"], ours["w2b"] = _rand(B, R, gen=gen), _rand(R, D * kk, gen=gen)
        oracle["w2a"] = ours["w2a"]
        oracle["w2b"] = ours["w2b"] if kernel is None else ours["w2b"].reshape(R, D, *k)
    else:
        ours["t2"], ours["w2a"], ours["w2b"] = (
            _rand(R, R, *k, gen=gen),
            _rand(R, B, gen=gen),
            _rand(R, D, gen=gen),
        )
        oracle.update(t2=ours["t2"], w2a=ours["w2a"], w2b=ours["w2b"])
    return ours, oracle


CASES = [
    (w1, w2, kernel)
    for w1 in ["full", "lowrank"]
    for w2 in ["full", "lowrank", "tucker"]
    for kernel in [None, (3, 3), (1, 1)]
    if not (w2 == "tucker" and kernel != (3, 3))
]


@pytest.mark.parametrize("w1_mode,w2_mode,kernel", CASES)
@pytest.mark.parametrize("scale", [5.0 / R, 1.0])
def test_lokr_matches_oracle(w1_mode: str, w2_mode: str, kernel, scale: float) -> None:
    gen = torch.Generator().manual_seed(CASES.index((w1_mode, w2_mode, kernel)))
    ours, oracle = _layout(w1_mode, w2_mode, kernel, gen)
    shape = (OUT, IN) if kernel is None else (OUT, IN, *kernel)
    got = lokr_delta_weight(**ours, scale=scale, shape=shape)
    ref = lyco_lokr.kron_weight(
        oracle["w1"],
        oracle["w1a"],
        oracle["w1b"],
        oracle["w2"],
        oracle["w2a"],
        oracle["w2b"],
        oracle["t2"],
        scale=scale,
        backend="torch",
    ).reshape(shape)
    assert got.shape == shape
    assert (got - ref).abs().max().item() <= 1e-12
    assert ref.abs().max().item() > 0.1


def test_lokr_kron_index_formula() -> None:
    """ΔW[p·b+q, i·d+j, x, y] = s·W1[p,i]·W2[q,j,x,y], independent of any oracle."""
    gen = torch.Generator().manual_seed(11)
    w1, w2 = _rand(A, C, gen=gen), _rand(B, D, 3, 3, gen=gen)
    s = 0.37
    got = lokr_delta_weight(w1, None, None, w2, None, None, None, s, (OUT, IN, 3, 3))
    for p, q, i, j, x, y in [(0, 0, 0, 0, 0, 0), (2, 3, 1, 4, 2, 1), (1, 2, 0, 3, 1, 2)]:
        assert got[p * B + q, i * D + j, x, y].item() == pytest.approx(
            s * w1[p, i].item() * w2[q, j, x, y].item()
        )


def test_lokr_tensor_scale_and_grad() -> None:
    gen = torch.Generator().manual_seed(12)
    w1, w2 = _rand(A, C, gen=gen), _rand(B, D, gen=gen)
    sigma = torch.tensor(0.5, dtype=F64, requires_grad=True)
    got = lokr_delta_weight(w1, None, None, w2, None, None, None, sigma, (OUT, IN))
    got.sum().backward()
    assert sigma.grad.item() == pytest.approx(torch.kron(w1, w2).sum().item(), rel=1e-12)


def test_make_w2_accepts_4d_1x1_full_and_flat_conv() -> None:
    gen = torch.Generator().manual_seed(13)
    w2 = _rand(B, D, gen=gen)
    assert torch.equal(make_w2(w2=w2[:, :, None, None], kernel_size=(1, 1)), w2)
    assert torch.equal(make_w2(w2=w2[:, :, None, None]), w2)
    flat = _rand(B, D * 9, gen=gen)
    assert torch.equal(make_w2(w2=flat, kernel_size=(3, 3)), flat.reshape(B, D, 3, 3))
    w2a, w2b = _rand(B, R, gen=gen), _rand(R, D, 3, 3, gen=gen)  # LyCORIS 4-D low-rank w2_b
    ref = (w2a @ w2b.reshape(R, -1)).reshape(B, D, 3, 3)
    assert torch.equal(make_w2(w2a=w2a, w2b=w2b, kernel_size=(3, 3)), ref)


def test_tucker_w2_formula() -> None:
    gen = torch.Generator().manual_seed(14)
    t2, w2a, w2b = _rand(R, R, 3, 3, gen=gen), _rand(R, B, gen=gen), _rand(R, D, gen=gen)
    got = make_w2(w2a=w2a, w2b=w2b, t2=t2, kernel_size=(3, 3))
    q, j, x, y = 2, 3, 1, 0
    want = sum(t2[p, pp, x, y] * w2a[p, q] * w2b[pp, j] for p in range(R) for pp in range(R))
    assert got[q, j, x, y].item() == pytest.approx(want.item(), abs=1e-12)


def test_make_w1() -> None:
    gen = torch.Generator().manual_seed(15)
    w1a, w1b = _rand(A, R, gen=gen), _rand(R, C, gen=gen)
    assert torch.equal(make_w1(w1a=w1a, w1b=w1b), w1a @ w1b)
    with pytest.raises(ValueError, match="lokr_w1"):
        make_w1()
    with pytest.raises(ValueError, match="not both"):
        make_w1(w1=w1a @ w1b, w1a=w1a, w1b=w1b)


def test_lokr_bad_shapes() -> None:
    gen = torch.Generator().manual_seed(16)
    w1, w2 = _rand(A, C, gen=gen), _rand(B, D, gen=gen)
    with pytest.raises(ValueError, match="layer weight shape"):
        lokr_delta_weight(w1, None, None, w2, None, None, None, 1.0, (OUT, IN + 1))
    with pytest.raises(ValueError, match="lokr_t2"):
        make_w2(w2a=_rand(R, B, gen=gen), w2b=_rand(R, D, gen=gen), t2=_rand(R, R, 3, 3, gen=gen))
    with pytest.raises(ValueError, match="do not chain"):
        make_w2(w2a=_rand(B, R, gen=gen), w2b=_rand(R + 1, D, gen=gen))
    with pytest.raises(ValueError, match="does not fit kernel"):
        make_w2(w2=_rand(B, D, 3, 3, gen=gen))
