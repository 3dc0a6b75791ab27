"""LoHa ΔW vs the lycoris-lora 4.1.3 oracle, and the custom autograd vs gradcheck / plain autograd."""

from __future__ import annotations

import pytest
import torch
from lycoris.functional import loha as lyco_loha
from torch.utils._python_dispatch import TorchDispatchMode

from networks.functional import HadaWeight, HadaWeightTucker, KhatriRaoLinear, loha_delta_weight, tucker_half

F64 = torch.float64


def _randn(*shape: int, gen: torch.Generator, requires_grad: bool = False) -> torch.Tensor:
    return torch.randn(*shape, dtype=F64, generator=gen).requires_grad_(requires_grad)


def _flat_factors(o: int, m: int, r: int, gen: torch.Generator, requires_grad: bool = False):
    return tuple(_randn(*s, gen=gen, requires_grad=requires_grad) for s in [(o, r), (r, m), (o, r), (r, m)])


def _tucker_factors(o: int, i: int, r: int, k: tuple[int, int], gen: torch.Generator, rg: bool = False):
    t1 = _randn(r, r, *k, gen=gen, requires_grad=rg)
    w1a, w1b = _randn(r, o, gen=gen, requires_grad=rg), _randn(r, i, gen=gen, requires_grad=rg)
    t2 = _randn(r, r, *k, gen=gen, requires_grad=rg)
    w2a, w2b = _randn(r, o, gen=gen, requires_grad=rg), _randn(r, i, gen=gen, requires_grad=rg)
    return t1, w1a, w1b, t2, w2a, w2b


def _plain_tucker(t1, w1a, w1b, t2, w2a, w2b, scale):
    """Reference written as a single einsum per half, differentiated by plain autograd."""
    r1 = torch.einsum("pqxy,po,qi->oixy", t1, w1a, w1b)
    r2 = torch.einsum("pqxy,po,qi->oixy", t2, w2a, w2b)
    return scale * r1 * r2


# alpha != rank everywhere: s = alpha / r with alpha = 5, r = 3 or 4.
@pytest.mark.parametrize("r", [3, 4])
def test_loha_linear_matches_oracle(r: int) -> None:
    gen = torch.Generator().manual_seed(1)
    o, i = 24, 20
    s = 5.0 / r
    w1a, w1b, w2a, w2b = _flat_factors(o, i, r, gen)
    ours = loha_delta_weight(w1a, w1b, w2a, w2b, s, shape=(o, i))
    ref = lyco_loha.diff_weight(w1b, w1a, w2b, w2a, None, None, gamma=s, backend="torch")
    assert ours.shape == (o, i)
    assert (ours - ref).abs().max().item() <= 1e-12
    assert ref.abs().max().item() > 1.0  # not a trivially zero comparison


def test_loha_conv_flat_matches_oracle() -> None:
    gen = torch.Generator().manual_seed(2)
    o, i, k, r = 16, 8, (3, 3), 4
    s = 5.0 / r
    w1a, w1b, w2a, w2b = _flat_factors(o, i * 9, r, gen)
    ours = loha_delta_weight(w1a, w1b, w2a, w2b, s, shape=(o, i, *k))
    ref = lyco_loha.diff_weight(w1b, w1a, w2b, w2a, None, None, gamma=s, backend="torch").reshape(o, i, *k)
    assert ours.shape == (o, i, 3, 3)
    assert (ours - ref).abs().max().item() <= 1e-12
    # Row-major flattening of (in, kh, kw): element [o, i, x, y] is column i*9 + x*3 + y of the flat product.
    flat = s * (w1a @ w1b) * (w2a @ w2b)
    assert ours[5, 3, 2, 1].item() == pytest.approx(flat[5, 3 * 9 + 2 * 3 + 1].item(), abs=1e-12)


@pytest.mark.parametrize("k", [(3, 3), (1, 3)])
def test_loha_conv_tucker_matches_oracle(k: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(3)
    o, i, r = 12, 10, 3
    s = 5.0 / r
    fac = _tucker_factors(o, i, r, k, gen)
    t1, w1a, w1b, t2, w2a, w2b = fac
    ours = loha_delta_weight(w1a, w1b, w2a, w2b, s, t1=t1, t2=t2, shape=(o, i, *k))
    gamma = torch.tensor(s, dtype=F64)  # spec §5 #18: the oracle's Tucker path wants a 0-d tensor
    ref = lyco_loha.diff_weight(w1b, w1a, w2b, w2a, t1, t2, gamma=gamma, backend="torch")
    assert ours.shape == (o, i, *k)
    assert (ours - ref).abs().max().item() <= 1e-12
    assert (ours - _plain_tucker(*fac, s)).abs().max().item() <= 1e-12


def test_hada_weight_gradcheck() -> None:
    gen = torch.Generator().manual_seed(4)
    fac = _flat_factors(5, 6, 2, gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *f: HadaWeight.apply(*f, 0.7), fac)
    scale = torch.tensor(0.7, dtype=F64, requires_grad=True)  # a trainable scalar (use_scalar σ)
    assert torch.autograd.gradcheck(HadaWeight.apply, (*fac, scale))
    # backward is built from differentiable ops, so second-order grads are right too
    assert torch.autograd.gradgradcheck(lambda *f: HadaWeight.apply(*f, 0.7), fac)


def test_hada_weight_tucker_gradcheck() -> None:
    gen = torch.Generator().manual_seed(5)
    fac = _tucker_factors(4, 3, 2, (3, 2), gen, rg=True)
    assert torch.autograd.gradcheck(lambda *f: HadaWeightTucker.apply(*f, 1.3), fac)
    scale = torch.tensor(1.3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(HadaWeightTucker.apply, (*fac, scale))
    assert torch.autograd.gradgradcheck(lambda *f: HadaWeightTucker.apply(*f, 1.3), fac)


def test_khatri_rao_linear_gradcheck() -> None:
    # the bypass Function of linear LoHa (rebuilds the Khatri–Rao factors in backward), r1 ≠ r2
    gen = torch.Generator().manual_seed(6)
    w = [_randn(*s, gen=gen, requires_grad=True) for s in [(5, 3), (3, 4), (5, 2), (2, 4)]]
    x = _randn(2, 3, 4, gen=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: KhatriRaoLinear.apply(*t, 0.7), (x, *w))
    scale = torch.tensor(0.7, dtype=F64, requires_grad=True)  # use_scalar σ
    assert torch.autograd.gradcheck(KhatriRaoLinear.apply, (x, *w, scale))


def test_hada_weight_grads_equal_plain_autograd() -> None:
    gen = torch.Generator().manual_seed(6)
    o, m, r, s = 20, 27, 4, 1.25
    fac = _flat_factors(o, m, r, gen, requires_grad=True)
    upstream = _randn(o, m, gen=gen)
    (HadaWeight.apply(*fac, s) * upstream).sum().backward()
    ours = [f.grad.clone() for f in fac]
    for f in fac:
        f.grad = None
    w1a, w1b, w2a, w2b = fac
    ((s * (w1a @ w1b) * (w2a @ w2b)) * upstream).sum().backward()
    for got, f in zip(ours, fac):
        assert (got - f.grad).abs().max().item() <= 1e-10
        assert f.grad.abs().max().item() > 1e-3


def test_hada_weight_tucker_grads_equal_plain_autograd_and_catch_other_half_bug() -> None:
    gen = torch.Generator().manual_seed(7)
    o, i, r, k, s = 9, 7, 3, (3, 3), 0.8
    fac = _tucker_factors(o, i, r, k, gen, rg=True)
    upstream = _randn(o, i, *k, gen=gen)
    (HadaWeightTucker.apply(*fac, s) * upstream).sum().backward()
    ours = [f.grad.clone() for f in fac]
    for f in fac:
        f.grad = None
    (_plain_tucker(*fac, s) * upstream).sum().backward()
    for got, f in zip(ours, fac):
        assert (got - f.grad).abs().max().item() <= 1e-10
    # The bug of spec §5 #1 (dw1_a built from the OTHER half's chain) is far from the truth,
    # so the comparison above would catch it.
    t1, w1a, w1b, t2, w2a, w2b = (f.detach() for f in fac)
    m1 = s * upstream * tucker_half(t2, w2a, w2b)
    wrong_u = torch.einsum("pqxy,qi->pixy", t2, w2b)
    wrong = torch.einsum("oixy,pixy->po", m1, wrong_u)
    assert (wrong - fac[1].grad).abs().max().item() > 1e-2


def test_custom_functions_save_only_factors() -> None:
    """No O×M (or O×I×K) product is kept for backward: only the factors (spec §6 rule 2)."""
    gen = torch.Generator().manual_seed(8)
    saved: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.shape)
        return t

    fac = _flat_factors(30, 40, 2, gen, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = HadaWeight.apply(*fac, 0.5)
    assert out.shape == (30, 40)
    assert sorted(saved) == sorted(f.shape for f in fac)
    saved.clear()
    tfac = _tucker_factors(30, 40, 2, (3, 3), gen, rg=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        HadaWeightTucker.apply(*tfac, 0.5)
    assert sorted(saved) == sorted(f.shape for f in tfac)


def test_partial_requires_grad() -> None:
    gen = torch.Generator().manual_seed(9)
    w1a, w1b, w2a, w2b = _flat_factors(6, 5, 2, gen)
    w2a.requires_grad_(True)
    loha_delta_weight(w1a, w1b, w2a, w2b, 2.0).sum().backward()
    expected = (2.0 * (w1a @ w1b)) @ w2b.T
    assert (w2a.grad - expected).abs().max().item() <= 1e-12
    assert w1a.grad is None


def test_loha_delta_weight_bad_shapes() -> None:
    gen = torch.Generator().manual_seed(10)
    w1a, w1b, w2a, w2b = _flat_factors(6, 5, 2, gen)
    with pytest.raises(ValueError, match="do not chain"):
        loha_delta_weight(w1a, w1b[:1], w2a, w2b, 1.0)
    with pytest.raises(ValueError, match="layer weight shape"):
        loha_delta_weight(w1a, w1b, w2a, w2b, 1.0, shape=(6, 4))
    tfac = list(_tucker_factors(6, 5, 2, (3, 3), gen))
    tfac[1] = _randn(3, 6, gen=gen)  # w1a with the wrong rank
    t1, w1a_t, w1b_t, t2, w2a_t, w2b_t = tfac
    with pytest.raises(ValueError, match="Tucker factor shapes"):
        loha_delta_weight(w1a_t, w1b_t, w2a_t, w2b_t, 1.0, t1=t1, t2=t2)
    with pytest.raises(ValueError, match="together"):
        loha_delta_weight(w1a, w1b, w2a, w2b, 1.0, t1=_randn(2, 2, 3, 3, gen=gen))


class _MatmulDtypes(TorchDispatchMode):
    """Records the dtype of every matrix-product kernel that runs while active."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm, torch.ops.aten.addmm):
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("tucker", [False, True])
def test_backward_follows_forward_autocast(tucker: bool) -> None:
    """Under autocast the recomputed products in backward run in the autocast dtype (as plain
    autograd would), and the grads come back in the fp32 params' dtype, close to plain autograd."""
    gen = torch.Generator().manual_seed(17)
    if tucker:
        fac = [f.float().detach().requires_grad_(True) for f in _tucker_factors(12, 10, 4, (3, 3), gen)]
        fn, ref_fn = HadaWeightTucker.apply, _plain_tucker
    else:
        fac = [f.float().detach().requires_grad_(True) for f in _flat_factors(48, 40, 4, gen)]
        fn = HadaWeight.apply

        def ref_fn(w1a, w1b, w2a, w2b, s):
            return s * (w1a @ w1b) * (w2a @ w2b)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(*fac, 0.5)
        ref = ref_fn(*fac, 0.5)
    assert out.dtype == torch.bfloat16
    upstream = torch.randn(out.shape, generator=gen).to(torch.bfloat16)
    rec = _MatmulDtypes()
    with rec:
        grads = torch.autograd.grad(out, fac, upstream)
    assert rec.dtypes and all(d == torch.bfloat16 for d in rec.dtypes), rec.dtypes
    ref_grads = torch.autograd.grad(ref, fac, upstream)
    for g, rg in zip(grads, ref_grads):
        assert g.dtype == torch.float32
        assert ((g - rg).norm() / rg.norm()).item() < 0.05
