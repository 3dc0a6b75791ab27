"""The Triton modulated LayerNorm (library/anima/kernels/modulated_norm.py) against the torch path.

The torch path is what CUDA autocast runs: LayerNorm of x.float() in fp32, addcmul(shift, h, 1 + scale) in
fp32 (1 + scale rounded to half first), one half-precision cast per consumer, their fp32 grads summed in
fp32. On the CPU that path is spelled out (CPU autocast keeps LayerNorm in half precision).

Both are checked against the exact result (fp64 from the same half inputs): each output must be a correct
rounding to half of some value within an fp32 error bound of the exact one. The bound (`exact_and_bounds`
in the helper module named below) is derived from fp32's unit roundoff u = 2^-24 and the sums' depth
((8 + 4·log2 D)·u relative to the terms, a few thousandths of a bf16 ulp), so a half-precision rounding
anywhere inside (a grad summed in bf16, 1 + scale left unrounded) breaks it; the mutation test shows that.
Kernel and torch then differ only where their fp32 values straddle a half rounding midpoint: by one ulp, in a tiny fraction of elements (asserted), further
only where the bound itself spans several halves (grad x elements far below the terms they cancel from).

The kernel checks (tests/helpers/modulated_norm_cases.py) run in Triton's CPU interpreter in a child
process, which needs TRITON_INTERPRET=1 before Triton is imported; they are skipped only where Triton is
not installed. On a GPU the same checks also run natively, at the real shape too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from library.anima import model as anima_model
from library.anima.kernels import modulated_norm as mn
from networks.kernels.triton_common import enabled
from tests.helpers import modulated_norm_cases as cases
from tests.helpers.modulated_norm_cases import (
    EPS,
    check,
    exact_and_bounds,
    inputs,
    outside,
    run,
    torch_path,
    ulps,
)
from tests.helpers.triton_interpreter import HAS_TRITON, needs_gpu, run_json

# ----------------------------------------------------------------------------------------------- interpreter
# started when the tests are collected (tests/helpers/triton_interpreter.py)
INTERPRETER_CASES = ("-m", "tests.helpers.modulated_norm_cases")


@pytest.fixture(scope="module")
def interp() -> dict:
    """{check: "ok" or its failure} from `python -m tests.helpers.modulated_norm_cases` in the interpreter."""
    results = run_json(*INTERPRETER_CASES)
    assert list(results) == list(cases.all_checks())  # every check ran
    return results


def _passed(interp: dict, name: str) -> None:
    if interp[name] != "ok":
        pytest.fail(f"{name}, in the interpreter:\n{interp[name]}", pytrace=False)


@pytest.mark.parametrize("case", cases.CASES, ids=[cases.case_id(*c) for c in cases.CASES])
def test_kernel_and_torch_path_are_roundings_of_the_exact_result(interp, case):
    _passed(interp, f"kernel {cases.case_id(*case)}")


def test_unused_outputs_and_grads_not_needed(interp):
    _passed(interp, "unused outputs")


def test_block_with_the_kernel_forced_matches_the_torch_maths(interp):
    _passed(interp, "block")


def test_the_bound_catches_a_half_precision_rounding_inside():
    """The kernel checks' bound fails for the usual slips: consumers' grads summed in bf16, the token sums
    accumulated in bf16, 1 + scale not rounded before the product."""
    b, seq, d, n, dtype = 2, 45, 96, 3, torch.bfloat16
    x, scale, shift, grads = inputs(b, seq, d, n, dtype, "cpu")
    bounds = exact_and_bounds(x, scale, shift, grads)
    ys, rgrads = run(torch_path, x, scale, shift, grads, n)
    check([ys[0], *rgrads], bounds, "torch path")
    half_sum = grads[0] + grads[1] + grads[2]  # bf16 sums of the consumers' grads
    _, mut = run(torch_path, x, scale, shift, [half_sum], 1)
    assert outside(mut[0], *bounds[1]) > 1000  # of 8640; observed 3564
    assert outside(mut[1], *bounds[2]) > 20 and outside(mut[2], *bounds[3]) > 20  # of 192; observed 81, 96
    g = sum(t.float() for t in grads)
    h = F.layer_norm(x.float(), (d,), eps=EPS)
    acc = torch.zeros(b, 1, d, dtype=dtype)
    for i in range(seq):  # grad shift accumulated token by token in bf16
        acc = acc + g[:, i : i + 1].to(dtype)
    assert outside(acc, *bounds[3]) > 50  # of 192; observed 150
    unrounded = torch.addcmul(shift.float(), h, 1 + scale.float()).to(dtype)  # 1 + scale kept in fp32
    assert outside(unrounded, *bounds[0]) > 500  # of 8640; observed 1658


def test_bad_arguments_are_refused():
    x = torch.zeros(1, 2, 8, dtype=torch.bfloat16)
    s = torch.zeros(1, 1, 8, dtype=torch.bfloat16)
    if mn.triton is None:
        with pytest.raises(RuntimeError, match="Triton is not installed"):
            mn.modulated_layer_norm(x, s, s, EPS)
        return
    with pytest.raises(ValueError, match="n \\(consumers\\)"):
        mn.modulated_layer_norm(x, s, s, EPS, 4)
    with pytest.raises(ValueError, match="half dtype"):
        mn.modulated_layer_norm(x.float(), s, s, EPS)


# ----------------------------------------------------------------------------------------------- the model
def test_cpu_stays_on_the_torch_path(monkeypatch):
    norm = nn.LayerNorm(8, elementwise_affine=False, eps=EPS)
    x, scale, shift, _ = inputs(1, 3, 8, 1, torch.bfloat16, "cpu")
    assert not mn.usable(x, scale, shift, norm)  # a CPU tensor
    out = anima_model.modulated_norm_inputs(norm, x, scale, shift, 3)
    ref = anima_model.modulate(norm(x), scale, shift)
    assert len(out) == 3 and all(o is out[0] for o in out) and torch.equal(out[0], ref)
    monkeypatch.setenv(mn.ENV, "off")
    assert not enabled(mn.ENV)
    monkeypatch.setenv(mn.ENV, "on")
    assert enabled(mn.ENV) is HAS_TRITON


def test_attention_with_separate_kv_inputs_is_the_plain_call():
    torch.manual_seed(0)
    attn = anima_model.Attention(32, 32, 2, 16)
    x = torch.randn(2, 5, 32)
    assert torch.equal(attn(x), attn(x, kv_inputs=(x, x)))
    ctx = torch.randn(2, 7, 32)
    assert torch.equal(attn(x, context=ctx), attn(x, kv_inputs=(ctx, ctx)))


# ----------------------------------------------------------------------------------------------- CUDA only
@needs_gpu
@pytest.mark.parametrize("case", cases.CASES, ids=[cases.case_id(*c) for c in cases.CASES])
def test_cuda_kernel_and_torch_path_are_roundings_of_the_exact_result(case):
    cases.kernel_case(*case, "cuda")


@needs_gpu
def test_cuda_unused_outputs_and_grads_not_needed():
    cases.unused_outputs_case("cuda")


@needs_gpu
def test_cuda_block_with_the_kernel_forced_matches_the_torch_maths():
    cases.block_case("cuda")


def _autocast_path(norm: nn.LayerNorm, n: int):
    def fn(x, scale, shift, n_):
        with torch.autocast("cuda", dtype=x.dtype):
            h = anima_model.modulate(norm(x), scale, shift)
        assert h.dtype == torch.float32  # layer_norm is an fp32 autocast op
        return [h.to(x.dtype) for _ in range(n_)]  # what each consuming linear's autocast cast makes

    return fn


def _model_path(norm: nn.LayerNorm):
    def fn(x, scale, shift, n_):
        with torch.autocast("cuda", dtype=x.dtype):
            assert mn.usable(x, scale, shift, norm)
            return anima_model.modulated_norm_inputs(norm, x, scale, shift, n_)

    return fn


@needs_gpu
@pytest.mark.parametrize("n", [3, 1])
def test_real_shape_kernel_against_the_autocast_path(n):
    """B=2, L=4096, D=2048 under CUDA autocast: the model's kernel path against LayerNorm + modulate +
    the casts as autocast runs them; both roundings of values within the fp32 bound of the exact result,
    equal but for one-ulp midpoint straddles in a tiny fraction; the kernel is deterministic."""
    b, seq, d, dtype = 2, 4096, 2048, torch.bfloat16
    x, scale, shift, grads = inputs(b, seq, d, n, dtype, "cuda")
    norm = nn.LayerNorm(d, elementwise_affine=False, eps=EPS).cuda()
    ys, kgrads = run(_model_path(norm), x, scale, shift, grads, n)
    ys2, kgrads2 = run(_model_path(norm), x, scale, shift, grads, n)
    assert all(torch.equal(a, c) for a, c in zip([ys[0], *kgrads], [ys2[0], *kgrads2]))
    rys, rgrads = run(_autocast_path(norm, n), x, scale, shift, grads, n)
    bounds = exact_and_bounds(x, scale, shift, grads)
    check([rys[0], *rgrads], bounds, "autocast path")
    check([ys[0], *kgrads], bounds, "kernel")
    for name, a, r in zip(("y", "grad x", "grad scale", "grad shift"), [ys[0], *kgrads], [rys[0], *rgrads]):
        frac = float((ulps(a, r) > 0).float().mean())
        assert frac <= 64 * 2.0**-16, (name, frac)  # bf16: p = 8, as in the interpreter test


@needs_gpu
def test_path_choice_on_cuda(monkeypatch):
    x, scale, shift, _ = inputs(2, 16, 64, 1, torch.bfloat16, "cuda")
    norm = nn.LayerNorm(64, elementwise_affine=False, eps=EPS).cuda()
    assert not mn.usable(x, scale, shift, norm)  # no autocast: torch's maths
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert mn.usable(x, scale, shift, norm)
        assert not mn.usable(x, scale.half(), shift, norm)
        assert not mn.usable(x, scale, shift, nn.LayerNorm(64).cuda())  # affine
        compiled = torch.compile(lambda t: anima_model.modulated_norm_inputs(norm, t, scale, shift)[0],
                                 backend="eager")  # fmt: skip
        assert compiled(x).dtype == torch.float32  # traced: the torch path (fp32 until the linears cast)
        monkeypatch.setenv(mn.ENV, "off")
        assert not mn.usable(x, scale, shift, norm)
    with torch.autocast("cuda", dtype=torch.float16):
        assert not mn.usable(x, scale, shift, norm)  # the linears would cast to fp16, not x's bf16


@needs_gpu
def test_captured_in_a_cuda_graph():
    """Forward and backward replay from a CUDA graph (no host sync, torch allocations only) with the
    eager results, bit for bit."""
    x, scale, shift, grads = inputs(2, 100, 256, 3, torch.bfloat16, "cuda")
    leaves = [t.clone().requires_grad_() for t in (x, scale, shift)]

    def step():
        for t in leaves:
            t.grad = None
        ys = mn.modulated_layer_norm(*leaves, EPS, 3)
        torch.autograd.backward(list(ys), grads)
        return ys[0]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = [step().clone(), *(t.grad.clone() for t in leaves)]
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    for t in leaves:
        t.grad = None
    with torch.cuda.graph(graph):
        y = step()
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, c) for a, c in zip(eager, [y, *(t.grad for t in leaves)]))
