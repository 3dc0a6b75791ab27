"""The Anima Triton kernels (RoPE, gated residual) against the torch path, bit for bit.

The CPU cases run in Triton's interpreter in a child process (`tests/helpers/anima_kernels_cases.py`:
TRITON_INTERPRET must be set before Triton is imported and must not leak into this session); they are
skipped where Triton is not installed. On a GPU the same comparisons run natively at the real shapes
(B 2, 16 heads, 4096 tokens, head_dim 128, D 2048). gate's grad is the one result that is not bitwise by
construction: its fp32 sum over tokens runs in another order than torch's, so it is held to the bound that
follows from that (`_gate_tolerance`) and to bitwise equality where every sum is exact.
"""

from __future__ import annotations

import pytest
import torch

from library.anima import layers
from library.anima.kernels import common, residual, rope
from tests.helpers import anima_kernels_cases as cases
from tests.helpers.triton_interpreter import HAS_TRITON, eager_and_replayed, needs_gpu, run_json

# started when the tests are collected (tests/helpers/triton_interpreter.py)
INTERPRETER_CASES = ("-m", "tests.helpers.anima_kernels_cases")


@pytest.fixture(scope="module")
def interp() -> dict:
    """The JSON that `python -m tests.helpers.anima_kernels_cases` prints, run under the interpreter."""
    return run_json(*INTERPRETER_CASES)


def _failures(results: list[dict]) -> list[dict]:
    return [c for c in results if not cases.case_passes(c)]


def test_rope_kernel_equals_the_torch_path_bitwise(interp):
    assert len(interp["rope"]) == 8
    assert not _failures(interp["rope"])
    for c in interp["rope"]:  # the kernel really ran, the reference really did not, the layout is x's
        assert (c["kernel_fn"], c["torch_fn"], c["layout_kept"]) == ("_RopeBackward", "AddBackward0", True)


def test_gated_residual_kernel_equals_the_torch_path(interp):
    assert len(interp["residual"]) == 10
    assert not _failures(interp["residual"])
    for c in interp["residual"]:
        assert (c["kernel_fn"], c["torch_fn"]) == ("_GatedResidualBackward", "AddBackward0")
    exact = [c for c in interp["residual"] if "integers=True" in c["case"]]
    assert len(exact) == 2 and all(c["grad_gate_bitwise"] for c in exact)


def test_the_comparisons_catch_a_broken_kernel(interp):
    # an off-by-one in the rotation, a lost rounding, a −0 left as −0, a token missing from gate's sum
    assert interp["mutations"] == {name: True for name in cases.MUTATIONS}


def test_a_block_with_the_kernels_equals_the_torch_path(interp):
    for c in interp["block"]:
        assert c["forward"] and c["upstream_same"], c["case"]
        assert c["grads_differing"] == [], c
        assert c["gate_excess"] <= 1.0, c
        assert c["kernel_fns"] == ["_GatedResidualBackward"] * 3 and c["torch_fns"] == ["AddBackward0"] * 3
        assert c["rope_launches"] == [6, 0]  # q and k: forward, the checkpoint's recompute, backward


def test_cpu_tensors_take_the_torch_path_and_the_switch_turns_the_kernels_off(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, 5, 3, 8).to(torch.bfloat16).transpose(1, 2)
    assert not common.usable(x)  # a CPU tensor outside the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert common.usable(x) is HAS_TRITON
    assert not common.usable(x.float()) and not common.usable(x, x.half())  # fp32; mixed dtypes
    monkeypatch.setenv(common.ENV, "off")
    assert not common.usable(x)
    monkeypatch.setenv(common.ENV, "on")
    assert common.usable(x) is HAS_TRITON


def test_the_kernels_cover_only_the_shapes_they_are_written_for():
    x = torch.randn(2, 5, 3, 8).transpose(1, 2)
    cos = torch.randn(5, 8)
    assert rope.supports(x, cos, cos) and rope.supports(x, cos[None, None], cos)
    assert not rope.supports(x[..., :7], cos[:, :7], cos[:, :7])  # odd head_dim
    assert not rope.supports(x, torch.randn(2, 1, 5, 8), cos)  # a table per batch item
    assert not rope.supports(x, cos.requires_grad_(), torch.randn(5, 8))  # a table that needs grad
    assert not rope.supports(x[..., ::2], cos[:, ::2], cos[:, ::2])  # head_dim not unit-stride
    h = torch.randn(2, 7, 16)
    assert residual.supports(h, torch.randn(2, 1, 16), h)
    assert not residual.supports(h, torch.randn(1, 1, 16), h)  # gate broadcast over the batch too
    assert not residual.supports(h, torch.randn(2, 7, 16), h)  # a gate per token
    assert not residual.supports(h.transpose(1, 2), torch.randn(2, 1, 7), h.transpose(1, 2))


def test_the_torch_path_is_the_formula_with_the_table_cast_to_x_dtype():
    x = torch.randn(2, 6, 3, 12).to(torch.bfloat16).transpose(1, 2)
    ang = torch.randn(6, 12)
    c, s = ang.cos().bfloat16(), ang.sin().bfloat16()
    want = x * c + torch.cat((-x[..., 6:], x[..., :6]), dim=-1) * s
    assert cases.same_bits(layers.apply_rope(x, ang.cos(), ang.sin()), want)
    h, gate = torch.randn(2, 7, 16).bfloat16(), torch.randn(2, 1, 16).bfloat16()
    assert cases.same_bits(layers.gated_residual(h, gate, h * 2), h + gate * (h * 2))


# ----------------------------------------------------------------------------------------------- on a GPU
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_cuda_rope_at_the_real_shape(dtype):
    for c in (cases.rope_case((2, 16, 4096, 128), dtype, "cuda"),
              cases.rope_case((2, 16, 4096, 128), dtype, "cuda", seed=1, table="cast"),
              cases.rope_case((1, 3, 37, 12), dtype, "cuda", seed=2, layout="contiguous")):  # fmt: skip
        assert cases.case_passes(c) and c["kernel_fn"] == "_RopeBackward" and c["layout_kept"], c


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_cuda_gated_residual_at_the_real_shape(dtype):
    for c in (cases.residual_case((2, 4096, 2048), dtype, "cuda"),
              cases.residual_case((2, 4096, 2048), dtype, "cuda", seed=1, integers=True),
              cases.residual_case((3, 129, 130), dtype, "cuda", seed=2, need="go")):  # fmt: skip
        assert cases.case_passes(c) and c["kernel_fn"] == "_GatedResidualBackward", c


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_cuda_block_with_the_kernels_equals_the_torch_path(dtype):
    c = cases.block_case(dtype, device="cuda")
    assert c["forward"] and c["upstream_same"] and c["grads_differing"] == [] and c["gate_excess"] <= 1.0, c
    assert c["rope_launches"] == [6, 0] and c["kernel_fns"] == ["_GatedResidualBackward"] * 3


@needs_gpu
def test_cuda_fp16_takes_the_torch_path():
    # fp16 on the GPU differed from torch's bits (session 10, H100): CUDA fp16 stays on the torch path
    x = torch.randn(2, 5, 3, 8, device="cuda").half().transpose(1, 2)
    assert not common.usable(x) and common.usable(x.bfloat16())
    ang = torch.randn(5, 8, device="cuda")
    want = x * ang.cos().half() + layers.rotate_half(x) * ang.sin().half()
    assert torch.equal(layers.apply_rope(x, ang.cos(), ang.sin()), want)


@needs_gpu
def test_cuda_kernels_replay_in_a_cuda_graph():
    # --cuda_graph captures the training step: the kernels' launches, buffers and the partial-sum reduction
    # must replay to the eager results (warm-up outside the capture compiles them, as the trainers do)
    dev, dt = torch.device("cuda"), torch.bfloat16
    q = torch.randn(2, 256, 16, 128, device=dev).to(dt).transpose(1, 2).requires_grad_()
    ang = torch.randn(256, 128, device=dev)
    x, out = (torch.randn(2, 256, 2048, device=dev).to(dt).requires_grad_() for _ in range(2))
    gate = torch.randn(2, 1, 2048, device=dev).to(dt).requires_grad_()
    gq, gr = torch.randn_like(q), torch.randn_like(x)

    def step() -> list[torch.Tensor]:
        y = layers.apply_rope(q, ang.cos(), ang.sin())
        r = layers.gated_residual(x, gate, out)
        return [y, r, *torch.autograd.grad((y, r), (q, x, gate, out), (gq, gr))]

    eager, captured = eager_and_replayed(step)
    assert all(cases.same_bits(a, b) for a, b in zip(captured, eager))
