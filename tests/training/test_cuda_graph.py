"""library/cuda_graph.GraphedCall: replayed forward + backward equal the eager model call (CUDA only).

A tiny SDXL U-Net (real block layout) with each of our networks, gradient checkpointing on and rank
dropout active, runs several optimizer steps eagerly and through the graphs; outputs and every grad
must agree, including after the weights change, with gradient accumulation, with `.grad` set to None
between steps, with a second input shape (a second capture) and with an input that requires grad.
These need a GPU; the CPU suite checks the trainer's refusals (tests/training/test_train_compile.py).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from diffusers import UNet2DConditionModel

from library.sdxl.config import tiny_sdxl_configs
from library.training.cuda_graph import GraphedCall, GraphedUNet, enable_checkpointing_without_rng

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device"),
    pytest.mark.usefixtures("full_fp32"),  # tests/training/conftest.py
]


def _unet_and_network(algo: str, **net_args: str):
    torch.manual_seed(0)
    cfg = tiny_sdxl_configs()["unet"]
    unet = UNet2DConditionModel(**cfg).cuda()
    unet.requires_grad_(False)
    enable_checkpointing_without_rng(unet)
    unet.train()
    module = importlib.import_module(f"networks.{algo}")
    net = module.create_network(1.0, 4, 2, None, [], unet, **net_args)
    net.apply_to([], unet, apply_text_encoder=False, apply_unet=True)
    net.cuda().train()
    net.set_dropout_seed(5)
    if "module_dropout" in net_args:
        net.use_device_module_dropout()
    for p in net.parameters():  # a non-zero start so every factor gets a non-zero grad
        torch.nn.init.normal_(p, std=0.05)
    ctx_dim = cfg["cross_attention_dim"]
    pooled_dim = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    return unet, net, ctx_dim, pooled_dim


def _inputs(batch: int, ctx_dim: int, pooled_dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g).cuda()
    t = torch.randint(0, 1000, (batch,), generator=g).cuda()
    ctx = torch.randn(batch, 77, ctx_dim, generator=g).cuda()
    pooled = torch.randn(batch, pooled_dim, generator=g).cuda()
    ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch).cuda()
    target = torch.randn(batch, 4, 8, 8, generator=g).cuda()
    return (x, t, ctx, pooled, ids), target


def _call(unet):
    def call(x, t, ctx, pooled, ids):
        return unet(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample

    return call


def _loss_and_grads(fn, inputs, target, params):
    out = fn(*inputs)
    loss = torch.nn.functional.mse_loss(out.float(), target)
    loss.backward()
    return loss.detach().clone(), [p.grad.detach().clone() for p in params]


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return float((a.float() - b.float()).norm()) <= tol * float(b.float().norm()) + 1e-12


@pytest.mark.parametrize(
    "algo,extra",
    [
        ("loha", {}),
        ("lokr", {}),
        ("lora", {}),
        ("loha", {"merged_forward": "True"}),
        ("lokr", {"merged_forward": "True"}),
        ("lora", {"merged_forward": "True"}),
        ("loha", {"module_dropout": "0.5"}),
        ("lora", {"module_dropout": "0.5"}),
    ],
)
def test_graphed_steps_equal_eager_steps(algo: str, extra: dict) -> None:
    unet, net, ctx_dim, pooled_dim = _unet_and_network(algo, rank_dropout="0.3", **extra)
    params = [p for p in net.parameters() if p.requires_grad]
    graphed = GraphedCall(_call(unet), params, state_key=lambda: net.training)
    eager = _call(unet)
    for step in range(4):
        net.on_step_start()  # new rank-dropout masks, written into the buffer the graph reads
        inputs, target = _inputs(2, ctx_dim, pooled_dim, seed=step)
        loss_e, grads_e = _loss_and_grads(eager, inputs, target, params)
        for p in params:
            p.grad = None if step % 2 else torch.zeros_like(p)  # both zero_grad styles
        loss_g, grads_g = _loss_and_grads(graphed, inputs, target, params)
        assert _close(loss_g, loss_e, 1e-5), (step, float(loss_g), float(loss_e))
        for p, ge, gg in zip(params, grads_e, grads_g):
            assert float(ge.norm()) > 0 or "module_dropout" in extra  # a dropped module's grads are 0
            assert _close(gg, ge, 1e-4), (step, p.shape)
        with torch.no_grad():  # an optimizer step: the graph must read the updated weights
            for p, g in zip(params, grads_e):
                p.sub_(0.5 * g)
                p.grad = None
    assert len(graphed.captures) == 1 and graphed.replays == 4


def test_accumulation_second_shape_input_grads_and_stale_backward() -> None:
    unet, net, ctx_dim, pooled_dim = _unet_and_network("loha")
    params = [p for p in net.parameters() if p.requires_grad]
    graphed, eager = GraphedCall(_call(unet), params), _call(unet)
    net.on_step_start()
    (a, ta), (b, tb) = _inputs(2, ctx_dim, pooled_dim, 10), _inputs(2, ctx_dim, pooled_dim, 11)
    # gradient accumulation: two micro-batches add up in .grad
    for p in params:
        p.grad = None
    _loss_and_grads(eager, a, ta, params)
    _, want = _loss_and_grads(eager, b, tb, params)
    for p in params:
        p.grad = None
    _loss_and_grads(graphed, a, ta, params)
    _, got = _loss_and_grads(graphed, b, tb, params)
    assert all(_close(g, w, 1e-4) for g, w in zip(got, want))
    # a second batch size is a second capture; the first still replays correctly afterwards
    for batch, seed in ((3, 12), (2, 13)):
        inputs, target = _inputs(batch, ctx_dim, pooled_dim, seed)
        for p in params:
            p.grad = None
        _, want = _loss_and_grads(eager, inputs, target, params)
        for p in params:
            p.grad.zero_()
        _, got = _loss_and_grads(graphed, inputs, target, params)
        assert all(_close(g, w, 1e-4) for g, w in zip(got, want)), batch
    assert len(graphed.captures) == 2
    _check_capture_stats(graphed, [(2, 4, 8, 8), (3, 4, 8, 8)])
    # an input that requires grad (a trained text encoder's context) gets its grad back
    (x, t, ctx, pooled, ids), target = _inputs(2, ctx_dim, pooled_dim, 14)
    ctx_e, ctx_g = ctx.clone().requires_grad_(True), ctx.clone().requires_grad_(True)
    torch.nn.functional.mse_loss(eager(x, t, ctx_e, pooled, ids), target).backward()
    torch.nn.functional.mse_loss(graphed(x, t, ctx_g, pooled, ids), target).backward()
    assert float(ctx_e.grad.norm()) > 0 and _close(ctx_g.grad, ctx_e.grad, 1e-4)
    # a backward after the graph was replayed again would read overwritten activations: refused
    first = graphed(*a)
    graphed(*a)
    with pytest.raises(RuntimeError, match="backward of an older forward"):
        first.sum().backward()
    # without grad (samples, validation) the model runs eagerly
    with torch.no_grad():
        before = graphed.replays
        assert torch.equal(graphed(*a), eager(*a)) and graphed.replays == before


def _check_capture_stats(graphed: GraphedCall, shapes: list[tuple[int, ...]]) -> None:
    """One entry per capture, in capture order, with figures the allocator itself reports."""
    stats = graphed.capture_stats
    assert [s["shape"] for s in stats] == shapes
    for s in stats:
        assert s["seconds"] > 0
        assert s["reserved_bytes"] > 0
        assert s["peak_allocated_bytes"] >= s["allocated_bytes"] > 0
    # the first capture creates the shared pool: its segments are reserved memory (the warmup's cached
    # blocks are released before the capture, so the reserved delta may be smaller than the pool)
    assert 0 < stats[0]["pool_delta_bytes"] <= stats[0]["reserved_bytes"]


def test_bf16_autocast_and_the_unet_shim() -> None:
    unet, net, ctx_dim, pooled_dim = _unet_and_network("lokr", rank_dropout="0.2")
    params = [p for p in net.parameters() if p.requires_grad]
    shim = GraphedUNet(unet, params, state_key=lambda: net.training)
    net.on_step_start()
    (x, t, ctx, pooled, ids), target = _inputs(2, ctx_dim, pooled_dim, 20)
    cond = {"text_embeds": pooled, "time_ids": ids}
    results = []
    for fn in (unet, shim):
        for p in params:
            p.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fn(x, t, ctx, added_cond_kwargs=cond).sample
        torch.nn.functional.mse_loss(out.float(), target).backward()
        results.append((out.detach().float(), [p.grad.clone() for p in params]))
        del out  # an eager graph kept alive holds stale AccumulateGrad nodes that a capture must not meet
    (out_e, g_e), (out_g, g_g) = results
    assert _close(out_g, out_e, 1e-2)
    assert all(_close(g, w, 2e-2) for g, w in zip(g_g, g_e))
