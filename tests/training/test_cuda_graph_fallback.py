"""When GraphedCall captures, and what it does when a capture fails, on the CPU: the capture is replaced
by one that raises the error a CUDA stream capture gives, and the CUDA-only input check is lifted.

A capture that fails under the default graph step turns the run eager (one warning) instead of stopping
it; with an explicit --cuda_graph the error stands. The trainers run a signature's first call eagerly and
capture it on the second."""

from __future__ import annotations

import argparse
import logging
from types import SimpleNamespace

import pytest
import torch

from library.anima.trainer import AnimaArchitecture
from library.sdxl.trainer import SdxlArchitecture
from library.training import cuda_graph
from library.training.architecture import RunContext
from library.training.cuda_graph import GraphedCall
from library.training.step_mode import GRAPH_BY_DEFAULT, GRAPH_BY_FLAG, StepMode

CAPTURE_ERROR = "operation not permitted when stream is capturing\nmore detail"


@pytest.fixture
def failing_capture(monkeypatch):
    attempts: list[tuple[int, ...]] = []

    def capture(self, inputs):
        attempts.append(tuple(inputs[0].shape))
        raise RuntimeError(CAPTURE_ERROR)  # the message's first line is what the warning keeps

    monkeypatch.setattr(GraphedCall, "_measured_capture", capture)
    monkeypatch.setattr(GraphedCall, "_check_inputs", staticmethod(lambda inputs: None))
    return attempts


def _model_and_inputs():
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(6, 3)
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, 6, generator=gen))
        model.bias.copy_(torch.randn(3, generator=gen))
    return model, [torch.randn(4, 6, generator=gen) for _ in range(3)]


def test_default_step_goes_on_eagerly_after_a_failed_capture(failing_capture, caplog):
    model, xs = _model_and_inputs()
    eager_model, _ = _model_and_inputs()
    runner = GraphedCall(model, list(model.parameters()), fall_back=True)
    with caplog.at_level(logging.WARNING, logger=cuda_graph.__name__):
        for step, x in enumerate(xs):
            out = runner(x)
            out.square().sum().backward()
            ref = eager_model(x)
            ref.square().sum().backward()
            assert torch.equal(out, ref), step
            # the grads accumulate as in the eager step (nobody zeroes them here)
            assert torch.equal(model.weight.grad, eager_model.weight.grad), step
    assert failing_capture == [(4, 6)]  # tried once, then never again
    assert runner.failed == "RuntimeError: operation not permitted when stream is capturing"
    assert not runner.captures and runner.replays == 0
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        "cuda graph: capturing shape (4, 6) failed (RuntimeError: operation not permitted when stream is "
        "capturing); the run goes on with the eager step (step mode: eager). --no_cuda_graph skips the "
        "attempt; --cuda_graph makes it an error"
    ]


def test_asked_for_graph_step_keeps_the_error(failing_capture):
    model, xs = _model_and_inputs()
    runner = GraphedCall(model, list(model.parameters()))  # fall_back off: --cuda_graph
    with pytest.raises(RuntimeError, match="operation not permitted when stream is capturing"):
        runner(xs[0])
    assert runner.failed is None
    with pytest.raises(RuntimeError, match="stream is capturing"):  # and again: no silent switch
        runner(xs[1])
    assert len(failing_capture) == 2


def test_other_errors_are_not_swallowed(monkeypatch):
    """Bad input (not a capture failure) still raises under the default step."""
    model, xs = _model_and_inputs()
    runner = GraphedCall(model, list(model.parameters()), fall_back=True)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        runner(xs[0])
    assert runner.failed is None


@pytest.mark.parametrize(
    ("mode", "falls_back"),
    [(StepMode("graph", GRAPH_BY_DEFAULT), True), (StepMode("graph", GRAPH_BY_FLAG), False)],
)
def test_both_trainers_let_only_the_default_step_fall_back(mode, falls_back):
    ctx = RunContext(args=argparse.Namespace(), accelerator=None, weight_dtype=torch.float32, step_mode=mode)
    assert ctx.graph_step and ctx.graph_step_falls_back is falls_back
    model = torch.nn.Linear(2, 2)
    sdxl, anima = SdxlArchitecture(), AnimaArchitecture()
    sdxl.models = SimpleNamespace(unet=model)
    anima.models = SimpleNamespace(dit=model)
    sdxl.enable_cuda_graph(ctx, list(model.parameters()), lambda: None)
    anima.enable_cuda_graph(ctx, list(model.parameters()), lambda: None)
    assert sdxl.graphed_unet.graphed.fall_back is falls_back
    assert anima.graphed_dit.fall_back is falls_back
    assert sdxl.graphed_unet.graphed.eager_calls == anima.graphed_dit.eager_calls == 1


def test_a_signature_is_captured_on_its_call_after_the_eager_ones(failing_capture):
    """eager_calls=1: the first call of each shape runs eagerly (same output and grads as the model), the
    second one captures; a shape that comes once is never captured."""
    model, _ = _model_and_inputs()
    runner = GraphedCall(model, list(model.parameters()), eager_calls=1)
    a1, a2, b1 = torch.randn(4, 6), torch.randn(4, 6), torch.randn(5, 6)
    out = runner(a1)
    assert torch.equal(out, model(a1)) and out.grad_fn is not None and failing_capture == []
    assert torch.equal(runner(b1), model(b1)) and failing_capture == []  # another shape: eager too
    with pytest.raises(RuntimeError, match="stream is capturing"):
        runner(a2)  # the second call of (4, 6) captures
    assert failing_capture == [(4, 6)]
    with torch.no_grad():  # without grad nothing is captured nor counted
        runner(torch.randn(7, 6))
    assert sorted(k[0][0][0] for k in runner._seen) == [(4, 6), (5, 6)] and set(runner._seen.values()) == {1}
