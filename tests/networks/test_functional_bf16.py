"""Why the delta is applied on its own and W is never rebuilt (spec §3.6, §7 #15).

In bf16, apply_weight(x, ΔW) keeps the applied delta within 1% of the fp64 truth, while the
rebuild form (W + ΔW) − W loses most of it to W's rounding.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from networks.functional import (
    apply_weight,
    loha_delta_weight,
    loha_khatri_rao_linear,
    lokr_bypass_linear,
    lokr_delta_weight,
)

BF16, F64 = torch.bfloat16, torch.float64


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.to(F64) - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("ratio,rebuild_min_err", [(1e-3, 0.3), (1e-2, 0.05)])
def test_bf16_applied_delta_vs_rebuild(ratio: float, rebuild_min_err: float) -> None:
    gen = torch.Generator().manual_seed(40)
    o, i, r, n = 96, 80, 4, 64
    w = torch.randn(o, i, dtype=F64, generator=gen)
    fac = [torch.randn(*s, dtype=F64, generator=gen) for s in [(o, r), (r, i), (o, r), (r, i)]]
    delta = loha_delta_weight(*fac, 1.0)
    delta = delta * (ratio * w.norm() / delta.norm())  # ‖ΔW‖/‖W‖ = ratio
    x = torch.randn(n, i, dtype=F64, generator=gen)
    layer = nn.Linear(i, o, bias=False).to(BF16)
    truth = x @ delta.T

    ours = apply_weight(x.to(BF16), delta.to(BF16), layer)
    err_ours = _rel(ours, truth)

    w16 = w.to(BF16)
    rebuilt = (w16 + delta.to(BF16)) - w16  # what a rebuild forward effectively applies
    err_rebuild = _rel(apply_weight(x.to(BF16), rebuilt, layer), truth)
    err_outputs = _rel(
        apply_weight(x.to(BF16), w16 + delta.to(BF16), layer) - apply_weight(x.to(BF16), w16, layer), truth
    )

    assert err_ours <= 0.01, err_ours
    assert err_rebuild >= rebuild_min_err, err_rebuild
    assert err_outputs >= rebuild_min_err, err_outputs


def test_bf16_bypass_error_within_rebuild_error() -> None:
    """Spec §7 #14: in bf16 the bypasses stay within the rebuild path's own error vs fp64."""
    gen = torch.Generator().manual_seed(41)
    n = 256
    # LoKr: W1 (8, 8), W2 (16, 12) → ΔW (128, 96)
    w1, w2 = torch.randn(8, 8, dtype=F64, generator=gen), torch.randn(16, 12, dtype=F64, generator=gen)
    x = torch.randn(n, 96, dtype=F64, generator=gen)
    layer = nn.Linear(96, 128, bias=False).to(BF16)
    truth = lokr_bypass_linear(x, w1, w2, 0.5)
    assert (
        _rel(
            apply_weight(
                x, lokr_delta_weight(w1, None, None, w2, None, None, None, 0.5, (128, 96)), layer.double()
            ),
            truth,
        )
        < 1e-12
    )
    layer = layer.to(BF16)
    rebuild = apply_weight(
        x.to(BF16),
        lokr_delta_weight(w1.to(BF16), None, None, w2.to(BF16), None, None, None, 0.5, (128, 96)),
        layer,
    )
    bypass = lokr_bypass_linear(x.to(BF16), w1.to(BF16), w2.to(BF16), 0.5)
    err_rebuild, err_bypass = _rel(rebuild, truth), _rel(bypass, truth)
    print(f"bf16 rel err bypass {err_bypass:.2e} rebuild {err_rebuild:.2e}")
    assert 0 < err_rebuild < 0.02 and err_bypass <= 2 * err_rebuild, (err_bypass, err_rebuild)
    # LoHa Khatri–Rao, r = 4
    fac = [torch.randn(*s, dtype=F64, generator=gen) for s in [(128, 4), (4, 96), (128, 4), (4, 96)]]
    truth = x @ loha_delta_weight(*fac, 0.5).T
    rebuild = apply_weight(x.to(BF16), loha_delta_weight(*(f.to(BF16) for f in fac), 0.5), layer)
    bypass = loha_khatri_rao_linear(x.to(BF16), *(f.to(BF16) for f in fac), 0.5)
    err_rebuild, err_bypass = _rel(rebuild, truth), _rel(bypass, truth)
    print(f"bf16 rel err bypass {err_bypass:.2e} rebuild {err_rebuild:.2e}")
    assert 0 < err_rebuild < 0.02 and err_bypass <= 2 * err_rebuild, (err_bypass, err_rebuild)
