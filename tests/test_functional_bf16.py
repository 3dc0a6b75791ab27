"""Why the delta is applied on its own and W is never rebuilt (spec §3.6, §7 #15).

In bf16, apply_weight(x, ΔW) keeps the applied delta within 1% of the fp64 truth, while the
rebuild form (W + ΔW) − W loses most of it to W's rounding.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from networks.functional import apply_weight, loha_delta_weight

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
