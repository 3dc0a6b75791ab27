"""The LoHa Triton kernels (networks/kernels/loha_delta.py) against an fp64 reference and torch's path.

The CPU cases run in Triton's interpreter in a child process (`tests/helpers/loha_delta_cases.py`:
TRITON_INTERPRET must be set before Triton is imported and must not leak into this session); skipped where
Triton is not installed. Their shapes (77×130 with the interpreter's 32×32 tiles, two tiles a chunk) leave
edge tiles along both dimensions and a last chunk that runs past I; ranks 4 and 8 are padded to 16, 48
to 64. Bounds (`loha_delta_cases.failures`): fp32 within 1e-5 of fp64; bf16/fp16 within one rounding of
each element and no worse than torch's path. On a GPU the same checks run natively at SDXL's and Anima's
shapes, and through the fused Linear node inside a CUDA graph capture.
"""

from __future__ import annotations

import pytest
import torch

from networks.functional.fused_linear import rebuild_linear
from networks.functional.loha import LOHA_RULE, hada_delta, hada_grads
from networks.kernels import loha_delta
from networks.kernels.triton_common import interpreting
from tests.helpers import loha_delta_cases as cases
from tests.helpers.triton_interpreter import eager_and_replayed, needs_gpu, run_json

# started when the tests are collected (tests/helpers/triton_interpreter.py)
INTERPRETER_CASES = ("-m", "tests.helpers.loha_delta_cases")


@pytest.fixture(scope="module")
def interp() -> dict:
    """The JSON that `python -m tests.helpers.loha_delta_cases` prints, run under the interpreter."""
    return run_json(*INTERPRETER_CASES)


def test_build_and_grads_hold_their_bounds_against_fp64(interp):
    assert len(interp["cases"]) == 3 * len(cases.SHAPES) + 1
    assert [c["case"] for c in interp["cases"] if c["failures"]] == []
    for c in interp["cases"]:
        assert c["deterministic"] and c["dtypes_shapes"], c["case"]


def test_16_bit_results_round_once_where_torch_rounds_more(interp):
    # the one-rounding bound is sharp: torch's path (P1, P2 and the product each rounded) breaks it
    for c in interp["cases"]:
        if c["dtype"] != "float32":
            for name in cases.NAMES:
                tol = cases.EXCESS_FRACTION * cases.UNIT[getattr(torch, c["dtype"])]
                assert c["torch"][name]["excess"] > tol, (c["case"], name)
                assert c["kernel"][name]["rms"] < 0.8 * c["torch"][name]["rms"], (c["case"], name)


def test_the_bounds_catch_a_lost_edge_or_swapped_halves(interp):
    assert len(interp["mutations"]) == 4  # fp32, bf16, fp16 and the strided grad at 77×130, r = 8
    for m in interp["mutations"]:
        assert m == {"edge_row": True, "edge_col": True, "halves_swapped": True}


def test_grads_compute_only_what_is_needed(interp):
    assert [n["ok"] for n in interp["need"]] == [True] * 6


def test_usable_takes_only_what_the_kernel_is_written_for(interp):
    assert interp["usable"] == {
        "plain": True, "build": True, "no_grad": True, "mixed_dtype": False, "fp64": False,
        "rank_129": False, "grad_shape": False, "three_d": False, "halves_differ": False,
        "records_autograd": False, "autocast_other_dtype": False, "switched_off": False,
    }  # fmt: skip


@pytest.mark.skipif(interpreting(), reason="CPU tensors take the kernel under the interpreter")
def test_cpu_tensors_take_todays_torch_path_bit_for_bit():
    *f, grad = cases.inputs(9, 14, 3, torch.float64, "cpu")
    assert not loha_delta.usable(None, f) and not loha_delta.usable(grad, f)
    a1, b1, a2, b2 = f
    assert torch.equal(hada_delta(f), (a1 @ b1) * (a2 @ b2))
    m1, m2 = grad * (a2 @ b2), grad * (a1 @ b1)
    want = [m1 @ b1.T, a1.T @ m1, m2 @ b2.T, a2.T @ m2]
    got = hada_grads(grad, f, [True] * 4)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert hada_grads(grad, f, [False, True, True, False])[0::3] == [None, None]


REAL_SHAPES = [(640, 640), (1280, 1280), (10240, 1280), (2048, 8192)]


@needs_gpu
@pytest.mark.parametrize("o,i", REAL_SHAPES)
def test_cuda_real_shapes_hold_their_bounds(o, i):
    case = cases.measure(o, i, 32, torch.bfloat16, "cuda")
    assert cases.failures(case) == [], case["case"]


@needs_gpu
def test_cuda_rebuild_linear_replays_in_a_cuda_graph():
    # the trainer captures the step: the kernels, their partial buffers and torch's sums must replay to the
    # eager results, and those must match the torch path (LOHA_KERNEL=off) to bf16 rounding
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    o, i, r, n = 1280, 1280, 32, 512
    x = torch.randn(n, i, device=dev, generator=gen).bfloat16().requires_grad_()
    weight = (torch.randn(o, i, device=dev, generator=gen) * i**-0.5).bfloat16()
    factors = [(torch.randn(s, device=dev, generator=gen) * 0.2).requires_grad_()
               for s in ((o, r), (r, i), (o, r), (r, i))]  # fmt: skip
    gy = torch.randn(n, o, device=dev, generator=gen).bfloat16()

    def step() -> list[torch.Tensor]:
        y = rebuild_linear(x, weight, None, LOHA_RULE, 0.5, factors)
        return [y, *torch.autograd.grad(y, (x, *factors), gy)]

    eager, captured = eager_and_replayed(step)
    assert all(torch.equal(a, b) for a, b in zip(captured, eager))
    with cases.torch_path():
        plain = step()
    for k, p in zip(eager, plain):
        rel = ((k.float() - p.float()).abs().max() / p.float().abs().max()).item()
        # torch's path is within three bf16 roundings (P1, P2, product) of the exact value, the kernel's one
        assert rel < 4 * 2.0**-8, rel


def test_the_grads_kernel_runs_only_where_it_measured_faster():
    """On CUDA hada_grads takes the grads pass from GRADS_MIN_WEIGHTS weights up (the H100's measurement),
    torch's GEMMs below; the interpreter (CPU) always takes it, so the tests exercise it at small shapes."""
    assert not loha_delta.grads_pays(640, 640, "cuda")
    assert not loha_delta.grads_pays(2048, 2048, "cuda")
    assert not loha_delta.grads_pays(1280, 5120, "cuda")
    assert loha_delta.grads_pays(10240, 1280, "cuda")
    assert loha_delta.grads_pays(8192, 2048, "cuda") and loha_delta.grads_pays(2048, 8192, "cuda")
    assert loha_delta.grads_pays(77, 130, "cpu")
