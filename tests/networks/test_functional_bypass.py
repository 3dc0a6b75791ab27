"""Bypasses (never build ΔW) equal the rebuild path: outputs and the grads of every input (spec §6, §7 #14)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from networks.functional import (
    KronBypassLinear,
    apply_weight,
    loha_delta_weight,
    loha_khatri_rao_conv,
    loha_khatri_rao_linear,
    lokr_bypass_linear,
    lokr_delta_weight,
    make_w1,
    make_w2,
)

A, B, C, D, R = 3, 4, 2, 5, 3  # O = 12, I = 10
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _leaf(shape, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=gen).to(dtype).requires_grad_(True)


def _compare(fast_fn, slow_fn, inputs: list[torch.Tensor], dtype: torch.dtype, gen: torch.Generator) -> None:
    """Run both paths with the same upstream gradient; outputs and all input grads must agree."""
    fast = fast_fn()
    upstream = torch.randn(fast.shape, dtype=torch.float64, generator=gen).to(dtype)
    grads_fast = torch.autograd.grad(fast, inputs, upstream)
    slow = slow_fn()
    grads_slow = torch.autograd.grad(slow, inputs, upstream)
    tol = TOL[dtype]
    assert fast.shape == slow.shape
    scale_ref = slow.abs().max().item()
    assert scale_ref > 1e-3
    assert (fast - slow).abs().max().item() <= tol * max(1.0, scale_ref)
    for gf, gs in zip(grads_fast, grads_slow):
        assert gf.shape == gs.shape
        assert (gf - gs).abs().max().item() <= tol * max(1.0, gs.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("w1_mode", ["full", "lowrank"])
@pytest.mark.parametrize("w2_mode", ["full", "lowrank"])
def test_lokr_linear_bypass_equals_rebuild(dtype, w1_mode: str, w2_mode: str) -> None:
    gen = torch.Generator().manual_seed(30)
    layer = nn.Linear(C * D, A * B, bias=False).to(dtype)
    x = _leaf((2, 3, C * D), gen, dtype)
    w1p = (
        [_leaf((A, C), gen, dtype)]
        if w1_mode == "full"
        else [_leaf((A, R), gen, dtype), _leaf((R, C), gen, dtype)]
    )
    w2p = (
        [_leaf((B, D), gen, dtype)]
        if w2_mode == "full"
        else [_leaf((B, R), gen, dtype), _leaf((R, D), gen, dtype)]
    )
    scale = torch.tensor(0.6, dtype=dtype, requires_grad=True)  # a trainable σ·α/r, to check its grad too
    w1_kw = dict(w1=w1p[0]) if w1_mode == "full" else dict(w1a=w1p[0], w1b=w1p[1])
    w2_kw = dict(w2=w2p[0]) if w2_mode == "full" else dict(w2a=w2p[0], w2b=w2p[1])

    def fast():
        w1 = make_w1(**w1_kw)
        if w2_mode == "full":
            return lokr_bypass_linear(x, w1, w2p[0], scale)
        # low-rank W2 is built at (b, d) first, as LoKrModule does
        return lokr_bypass_linear(x, w1, make_w2(w2a=w2p[0], w2b=w2p[1]), scale)

    def slow():
        full = dict(w1=None, w1a=None, w1b=None, w2=None, w2a=None, w2b=None, t2=None) | w1_kw | w2_kw
        return apply_weight(x, lokr_delta_weight(**full, scale=scale, shape=(A * B, C * D)), layer)

    _compare(fast, slow, [x, *w1p, *w2p, scale], dtype, gen)


CONV_CASES = [
    ("full", dict(kernel_size=3, stride=2, padding=1)),
    ("full", dict(kernel_size=1)),
    ("full4d", dict(kernel_size=1)),
    ("lowrank", dict(kernel_size=3, padding=2, dilation=2)),
    ("lowrank", dict(kernel_size=1, stride=2)),
    ("tucker", dict(kernel_size=3, stride=2, padding=1)),
    ("tucker", dict(kernel_size=3, padding=1, padding_mode="reflect")),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_loha_khatri_rao_linear_equals_rebuild(dtype) -> None:
    gen = torch.Generator().manual_seed(32)
    o, i, r = 14, 9, 3
    layer = nn.Linear(i, o, bias=False).to(dtype)
    x = _leaf((4, i), gen, dtype)
    fac = [_leaf(s, gen, dtype) for s in [(o, r), (r, i), (o, r), (r, i)]]
    s = 5.0 / r

    def slow():
        return apply_weight(x, loha_delta_weight(*fac, s, shape=(o, i)), layer)

    _compare(lambda: loha_khatri_rao_linear(x, *fac, s), slow, [x, *fac], dtype, gen)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_loha_khatri_rao_conv_equals_rebuild(dtype) -> None:
    gen = torch.Generator().manual_seed(33)
    o, i, r = 6, 4, 2
    layer = nn.Conv2d(i, o, 3, stride=2, padding=1, bias=False).to(dtype)
    x = _leaf((2, i, 7, 7), gen, dtype)
    fac = [_leaf(s, gen, dtype) for s in [(o, r), (r, i * 9), (o, r), (r, i * 9)]]
    s = 0.4

    def slow():
        return apply_weight(x, loha_delta_weight(*fac, s, shape=layer.weight.shape), layer)

    _compare(lambda: loha_khatri_rao_conv(x, *fac, s, layer), slow, [x, *fac], dtype, gen)


def test_bypass_rejects_bad_input() -> None:
    x = torch.randn(2, 11)
    with pytest.raises(ValueError, match="expected c·d"):
        lokr_bypass_linear(x, torch.randn(A, C), torch.randn(B, D), 1.0)


def test_kron_bypass_linear_gradcheck_and_saved_tensors() -> None:
    gen = torch.Generator().manual_seed(34)
    xv = _leaf((2, 3, C, D), gen, torch.float64)
    w1, w2 = _leaf((A, C), gen, torch.float64), _leaf((B, D), gen, torch.float64)
    assert torch.autograd.gradcheck(lambda *t: KronBypassLinear.apply(*t, 0.7), (xv, w1, w2))
    scale = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(KronBypassLinear.apply, (xv, w1, w2, scale))
    # Y = X·W2ᵀ (…, c, b) is recomputed in backward, not stored
    saved: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        KronBypassLinear.apply(xv, w1, w2, 0.7)
    assert sorted(saved) == sorted([tuple(xv.shape), (A, C), (B, D)])


def test_kron_bypass_linear_under_autocast() -> None:
    """Under autocast the recompute runs in bf16 like the forward; grads land in fp32 near plain autograd."""
    gen = torch.Generator().manual_seed(36)
    x = torch.randn(64, C * D, generator=gen)
    w1, w2 = _leaf((A, C), gen, torch.float32), _leaf((B, D), gen, torch.float32)
    layer = nn.Linear(C * D, A * B, bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lokr_bypass_linear(x, w1, w2, 0.9)
        ref = apply_weight(
            x, lokr_delta_weight(w1, None, None, w2, None, None, None, 0.9, (A * B, C * D)), layer
        )
    assert out.dtype == torch.bfloat16
    upstream = torch.randn(out.shape, generator=gen).to(torch.bfloat16)
    mm_dtypes: list[torch.dtype] = []

    class Rec(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm):
                mm_dtypes.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    with Rec():
        grads = torch.autograd.grad(out, [w1, w2], upstream)
    assert mm_dtypes and all(d == torch.bfloat16 for d in mm_dtypes), mm_dtypes
    for g, rg in zip(grads, torch.autograd.grad(ref, [w1, w2], upstream)):
        assert g.dtype == torch.float32
        assert ((g - rg).norm() / rg.norm()).item() < 0.05
