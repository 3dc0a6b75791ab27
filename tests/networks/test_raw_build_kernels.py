"""The build kernels that cast the fp32 factors themselves (DeltaRule.raw_build: networks/kernels/loha_delta.py
for LoHa, networks/kernels/kron_delta.py for full/full LoKr) against the casts and build they replace.

The CPU cases run in Triton's interpreter in a child process (`tests/helpers/raw_build_cases.py`); skipped
where Triton is not installed. Everything is compared bit for bit: ΔW and each cast factor for fp32, bf16 and
fp16 compute dtypes, s = 1, 0.37 and −2.5, at shapes with edge tiles both ways; and the fused Linear node
with the raw build and without it (output and every grad). On a GPU the same checks run natively at SDXL's
shapes and inside a CUDA graph capture.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from networks.functional.fused_linear import rebuild_linear
from networks.functional.loha import LOHA_RULE
from networks.kernels.triton_common import interpreting
from tests.helpers import raw_build_cases as cases
from tests.helpers.triton_interpreter import eager_and_replayed, needs_gpu, run_json

# started when the tests are collected (tests/helpers/triton_interpreter.py)
INTERPRETER_CASES = ("-m", "tests.helpers.raw_build_cases")


@pytest.fixture(scope="module")
def interp() -> dict:
    """The JSON that `python -m tests.helpers.raw_build_cases` prints, run under the interpreter."""
    return run_json(*INTERPRETER_CASES)


def test_raw_builds_give_the_casts_and_build_bit_for_bit(interp):
    builds = interp["builds"]
    n_scales, n_dtypes = len(cases.SCALES), len(cases.DTYPES)
    assert len(builds) == (len(cases.LOHA_SHAPES) + len(cases.LOKR_SHAPES)) * n_dtypes * n_scales
    bad = [b for b in builds if not (b["taken"] and b["delta"] and all(b["casts"]) and b["identity"])]
    assert bad == []
    assert [b["case"] for b in builds if not b["every_element_written"]] == []


def test_the_check_is_sharp_rounding_the_factors_changes_delta(interp):
    # ΔW from the unrounded factors differs from the raw build's in many elements at 16 bits, so its
    # equality with the casts-then-build path shows the factors are rounded as the casts round them
    for b in interp["builds"]:
        if "float32" in b["case"]:
            assert b["differs_unrounded"] == 0, b["case"]
        elif "(1, 1)" not in b["case"]:
            assert b["differs_unrounded"] > 100, b["case"]


def test_the_fused_node_is_unchanged_bit_for_bit(interp):
    nodes = interp["nodes"]
    assert len(nodes) == 2 * len(cases.DTYPES) * 2
    for n in nodes:
        assert n["taken"] == 1, n["case"]  # the forward took the raw build, once
        assert len(n["equal"]) in (8, 6) and all(n["equal"]), n  # y, grad x, W, b and each factor's


def test_calls_the_kernels_do_not_take_fall_back(interp):
    assert interp["fallbacks"] == {
        "loha": True, "lokr": True, "loha_fp64_dtype": False, "lokr_fp64_dtype": False,
        "loha_bf16_factors": False, "lokr_bf16_factors": False, "loha_strided": False, "lokr_strided": False,
        "loha_empty": False, "lokr_empty": False, "lokr_three_d": False, "lokr_three_factors": False,
        "loha_records_autograd": False, "lokr_records_autograd": False, "low_rank_rules": [True, True, True],
        "loha_autocast_other_dtype": False, "loha_switched_off": False, "lokr_switched_off": False,
        "loha_raw_cast_off": False, "loha_build_kernel_with_raw_cast_off": True,
    }  # fmt: skip


@pytest.mark.skipif(interpreting(), reason="CPU tensors take the kernels under the interpreter")
@pytest.mark.parametrize("rule", [LOHA_RULE, cases.LOKR_RULE], ids=["loha", "lokr"])
def test_cpu_tensors_take_the_casts_and_build(rule):
    factors = (
        cases.loha_factors(9, 14, 3, "cpu") if rule is LOHA_RULE else cases.lokr_factors(3, 4, 5, 2, "cpu")
    )
    assert rule.raw_build(factors, torch.bfloat16, 0.5) is None
    delta, cast = rule.build_cast(factors, torch.bfloat16, 0.5)
    want = cases.casts(rule, factors, torch.bfloat16, 0.5)
    assert all(cases.same_bits(c, w) for c, w in zip(cast, want))
    assert cases.same_bits(delta, rule.build(want))


LOHA_SHAPES = [(640, 640), (1280, 1280), (10240, 1280), (1280, 5120)]
LOKR_SHAPES = [(32, 40, 32, 40), (20, 32, 20, 32), (32, 40, 32, 64)]


def _failed(result: dict) -> bool:
    return not (result["taken"] and result["delta"] and all(result["casts"]) and result["identity"])


@needs_gpu
@pytest.mark.parametrize("scale", [1.0, 0.37])
@pytest.mark.parametrize("o,i", LOHA_SHAPES)
def test_cuda_loha_raw_build_at_sdxl_shapes(o, i, scale):
    for dtype in cases.DTYPES:
        result = cases.compare(LOHA_RULE, cases.loha_factors(o, i, 32, "cuda"), dtype, scale)
        assert not _failed(result) and result["every_element_written"], result


@needs_gpu
@pytest.mark.parametrize("scale", [1.0, 0.37])
@pytest.mark.parametrize("shape", LOKR_SHAPES)
def test_cuda_lokr_raw_build_at_sdxl_shapes(shape, scale):
    for dtype in cases.DTYPES:
        result = cases.compare(cases.LOKR_RULE, cases.lokr_factors(*shape, "cuda"), dtype, scale)
        assert not _failed(result) and result["every_element_written"], result


@needs_gpu
@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_cuda_fused_node_with_raw_build_replays_in_a_cuda_graph(algo):
    # the trainer captures the step: with the raw build the captured replay equals the eager step, and both
    # equal the casts-then-build node bit for bit (output and every grad)
    rule, factors = (
        (LOHA_RULE, cases.loha_factors(1280, 1280, 32, "cuda"))
        if algo == "loha"
        else (cases.LOKR_RULE, cases.lokr_factors(32, 40, 32, 40, "cuda"))
    )
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(512, 1280, device=dev, generator=gen).to(bf16).requires_grad_()
    weight = (torch.randn(1280, 1280, device=dev, generator=gen) * 1280**-0.5).to(bf16)
    leaves = [f.clone().requires_grad_() for f in factors]
    gy = torch.randn(512, 1280, device=dev, generator=gen).to(bf16)
    with_raw, taken = cases.counted(rule)

    def step(r) -> list[torch.Tensor]:
        y = rebuild_linear(x, weight, None, r, 0.37, leaves)
        return [y, *torch.autograd.grad(y, (x, *leaves), gy)]

    eager, captured = eager_and_replayed(lambda: step(with_raw))
    assert taken[0] == 2  # eager and captured forward took the raw build
    assert all(cases.same_bits(a, b) for a, b in zip(captured, eager))
    plain = step(dataclasses.replace(rule, raw_build=None))
    assert all(cases.same_bits(a, b) for a, b in zip(eager, plain))
    assert cases.node_compare(rule, factors, bf16, 0.37)["equal"] == [True] * (len(factors) + 4)
