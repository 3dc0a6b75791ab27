"""The rules' raw builds (DeltaRule.raw_build: the build kernels that cast the fp32 factors themselves) against
the casts and build they replace, bit for bit.

`python -m tests.helpers.raw_build_cases` runs them under Triton's interpreter (run by
tests/networks/test_raw_build_kernels.py in a child process) and prints one JSON line; the CUDA tests call
`compare` and `node_compare` directly at the real shapes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import torch

from networks.functional.fused_linear import DeltaRule, cast_scaled, rebuild_linear
from networks.functional.loha import LOHA_RULE
from networks.functional.lokr import LOKR_RULES
from networks.kernels import kron_delta, loha_delta
from networks.kernels.triton_common import switched_off

LOKR_RULE = LOKR_RULES[(False, False)]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SCALES = (1.0, 0.37, -2.5)  # s = 1 (plain casts), an s whose product with a factor rounds, a negative one
# LoHa (O, I, r): edge tiles both ways at the interpreter's 32×32 tiles, r padded to 16 or 64 in the kernel
LOHA_SHAPES = [(77, 130, 8), (33, 17, 3), (64, 96, 48)]
# LoKr (a, b, c, d): ΔW 35×33 and 80×111 (blocks of W2 spanning the interpreter's 16×16 tiles), 64×64 (whole
# tiles), 1×1
LOKR_SHAPES = [(5, 7, 3, 11), (2, 40, 3, 37), (4, 16, 4, 16), (1, 1, 1, 1)]


def loha_factors(o: int, i: int, r: int, device: str, seed: int = 0) -> list[torch.Tensor]:
    """fp32 w1a, w1b, w2a, w2b ~ N(0, 1/r), N(0, 1) so the products stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen) * k).to(device) for s, k in
            (((o, r), r**-0.5), ((r, i), 1.0), ((o, r), r**-0.5), ((r, i), 1.0))]  # fmt: skip


def lokr_factors(a: int, b: int, c: int, d: int, device: str, seed: int = 0) -> list[torch.Tensor]:
    """fp32 W1 (a, c) and W2 (b, d) ~ N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(a, c, generator=gen).to(device), torch.randn(b, d, generator=gen).to(device)]


def casts(
    rule: DeltaRule, factors: Sequence[torch.Tensor], dtype: torch.dtype, scale: float
) -> list[torch.Tensor]:
    """What RebuildLinear casts without a raw build."""
    return [cast_scaled(f, dtype, scale if k == rule.scaled_index else 1.0) for k, f in enumerate(factors)]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def compare(rule: DeltaRule, factors: list[torch.Tensor], dtype: torch.dtype, scale: float) -> dict:
    """raw_build against the casts and build: ΔW and every cast bit for bit, and which casts come back as the
    factors themselves (where cast_scaled hands them back: fp32 without s)."""
    got = rule.raw_build(factors, dtype, scale)
    want = casts(rule, factors, dtype, scale)
    out = {"case": f"{rule.name} {[tuple(f.shape) for f in factors]} {str(dtype)[6:]} s={scale}",
           "taken": got is not None}  # fmt: skip
    if got is None:
        return out
    delta, cast = got
    ref = rule.build(want)
    out["delta"] = same_bits(delta, ref)
    out["casts"] = [same_bits(c, w) for c, w in zip(cast, want)]
    out["identity"] = [c is f for c, f in zip(cast, factors)] == [w is f for w, f in zip(want, factors)]
    # the check is sharp: ΔW from the unrounded factors (s·W1 in fp32), rounded once, differs from it
    unrounded = rule.build(casts(rule, factors, torch.float32, scale)).to(dtype)
    out["differs_unrounded"] = int((unrounded != delta).sum())
    out["every_element_written"] = every_element_written(rule, factors, dtype, scale)
    return out


def every_element_written(
    rule: DeltaRule, factors: list[torch.Tensor], dtype: torch.dtype, scale: float
) -> bool:
    """The kernel run with NaN-filled cast targets (instead of empty ones, which may hold anything, the right
    bits included): none left, so each element of each cast is written (by one program: the ownership masks)."""
    targets = [torch.full_like(f, float("nan"), dtype=dtype) for f in factors]
    if rule is LOHA_RULE:
        loha_delta._build(*factors, cast=(targets, scale))
    else:
        kron_delta._build(*factors, targets, scale)
    return all(torch.equal(t, w) for t, w in zip(targets, casts(rule, factors, dtype, scale)))


def counted(rule: DeltaRule) -> tuple[DeltaRule, list[int]]:
    """The rule with its raw_build counting the calls it takes."""
    taken = [0]

    def raw(factors, dtype, scale):
        got = rule.raw_build(factors, dtype, scale)
        taken[0] += got is not None
        return got

    return dataclasses.replace(rule, raw_build=raw), taken


def node_compare(
    rule: DeltaRule, factors: list[torch.Tensor], dtype: torch.dtype, scale: float, seed: int = 1
) -> dict:
    """rebuild_linear with the rule's raw build and without it (the casts and build): the output and the
    grads of x, W, b and every factor bit for bit; `taken`: how often the raw build ran (forward only)."""
    o, i = rule.build(casts(rule, factors, torch.float32, 1.0)).shape
    dev = factors[0].device
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, i, generator=gen).to(dev, dtype)
    w = (torch.randn(o, i, generator=gen) * i**-0.5).to(dev, dtype)
    b = torch.randn(o, generator=gen).to(dev, dtype)
    gy = torch.randn(2, 5, o, generator=gen).to(dev, dtype)
    with_raw, taken = counted(rule)
    results = []
    for r in (with_raw, dataclasses.replace(rule, raw_build=None)):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, *factors)]
        y = rebuild_linear(leaves[0], leaves[1], leaves[2], r, scale, leaves[3:])
        results.append([y.detach(), *torch.autograd.grad(y, leaves, gy)])
    return {"case": f"node {rule.name} {str(dtype)[6:]} s={scale}", "taken": taken[0],
            "equal": [same_bits(a, b) for a, b in zip(*results)]}  # fmt: skip


def fallbacks(device: str) -> dict:
    """raw_build's None (the casts and build run instead) for calls its kernel does not take."""
    f = loha_factors(9, 14, 3, device)
    k = lokr_factors(3, 4, 5, 2, device)
    bf16 = torch.bfloat16

    def loha(fs, dtype=bf16):
        return LOHA_RULE.raw_build(fs, dtype, 0.5) is not None

    def lokr(fs, dtype=bf16):
        return LOKR_RULE.raw_build(fs, dtype, 0.5) is not None

    out = {
        "loha": loha(f), "lokr": lokr(k),
        "loha_fp64_dtype": loha(f, torch.float64), "lokr_fp64_dtype": lokr(k, torch.float64),
        "loha_bf16_factors": loha([t.to(bf16) for t in f]), "lokr_bf16_factors": lokr([t.to(bf16) for t in k]),
        "loha_strided": loha([f[0], f[1].T.contiguous().T, f[2], f[3]]), "lokr_strided": lokr([k[0].T, k[1]]),
        "loha_empty": loha(loha_factors(0, 14, 3, device)), "lokr_empty": lokr(lokr_factors(0, 4, 5, 2, device)),
        "lokr_three_d": lokr([k[0], k[1][..., None]]), "lokr_three_factors": lokr([*k, k[1]]),
        "loha_records_autograd": loha([f[0].clone().requires_grad_(), *f[1:]]),
        "lokr_records_autograd": lokr([k[0].clone().requires_grad_(), k[1]]),
        "low_rank_rules": [r.raw_build is None for key, r in LOKR_RULES.items() if key != (False, False)],
    }  # fmt: skip
    with torch.autocast(device, dtype=torch.float16):  # torch's LoHa products would compute in fp16
        out["loha_autocast_other_dtype"] = loha(f)
    with switched_off(loha_delta.ENV):
        out["loha_switched_off"] = loha(f)
    with switched_off(loha_delta.RAW_ENV):  # the casts alone switched off: the build kernel still runs
        out["loha_raw_cast_off"] = loha(f)
        out["loha_build_kernel_with_raw_cast_off"] = (
            loha_delta.try_build(casts(LOHA_RULE, f, bf16, 0.5)) is not None
        )
    with switched_off(kron_delta.ENV):
        out["lokr_switched_off"] = lokr(k)
    return out


def main() -> None:
    builds = [compare(LOHA_RULE, loha_factors(o, i, r, "cpu"), dt, s)
              for o, i, r in LOHA_SHAPES for dt in DTYPES for s in SCALES]  # fmt: skip
    builds += [compare(LOKR_RULE, lokr_factors(*shape, "cpu"), dt, s)
               for shape in LOKR_SHAPES for dt in DTYPES for s in SCALES]  # fmt: skip
    nodes = [
        node_compare(LOHA_RULE, loha_factors(77, 130, 8, "cpu"), dt, s) for dt in DTYPES for s in (1.0, 0.6)
    ]
    nodes += [
        node_compare(LOKR_RULE, lokr_factors(5, 7, 3, 11, "cpu"), dt, s) for dt in DTYPES for s in (1.0, 0.6)
    ]
    print(json.dumps({"builds": builds, "nodes": nodes, "fallbacks": fallbacks("cpu")}))


if __name__ == "__main__":
    main()
