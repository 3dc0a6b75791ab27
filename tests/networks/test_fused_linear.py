"""The fused Linear + adapter nodes (networks/functional/fused_linear.py).

Proves: fp64 gradcheck of the custom Functions: AdapterLinear in both forms (LoRA down/up with s, rebuilt ΔW)
and RebuildLinear with the LoHa rule and every LoKr layout rule, with and without bias and with every input
differentiable; the factors' grads come back in their own dtype; on the network, the patched layer takes the
right node and equals base + drop(ΔW·x) in fp64 with every grad (rank dropout, σ, α ≠ dim); it steps aside
where it does not apply; under bf16 autocast it matches the unfused path to bf16 rounding and keeps fp32 grads.
"""

from __future__ import annotations

import pytest
import torch

from networks import loha, lokr, lora
from networks.functional.fused_linear import AdapterLinear, RebuildLinear, adapter_linear, rebuild_linear
from networks.functional.loha import LOHA_RULE
from networks.functional.lokr import LOKR_RULES, kron_grads
from tests.helpers.sdxl_network import build_tiny_sdxl, randomize


@pytest.mark.parametrize("scale", [1.0, 0.7])
@pytest.mark.parametrize("with_down", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck_fp64(with_down: bool, with_bias: bool, scale: float) -> None:
    g = torch.Generator().manual_seed(0)

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    o, i, r = 5, 6, 3
    x, w = t(2, 4, i), t(o, i)
    b = t(o) if with_bias else None
    down = t(r, i) if with_down else None
    up = t(o, r) if with_down else t(o, i)
    assert torch.autograd.gradcheck(
        lambda x, w, b, down, up: AdapterLinear.apply(x, w, None, b, down, up, scale), (x, w, b, down, up)
    )
    # and the value is the plain formula
    ref = torch.nn.functional.linear(x, w, b) + scale * (x @ down.t() @ up.t() if with_down else x @ up.t())
    assert torch.allclose(adapter_linear(x, w, b, down, up, scale), ref, rtol=0, atol=1e-12)


RULES = [("loha", None)] + [("lokr", key) for key in LOKR_RULES]  # key: (w1 low-rank, w2 low-rank)
RULE_IDS = ["loha"] + [f"lokr-w1{'lr' if k[0] else 'full'}-w2{'lr' if k[1] else 'full'}" for k in LOKR_RULES]


def _rule_and_factors(algo: str, key, t):
    if algo == "loha":
        return LOHA_RULE, [t(6, 3), t(3, 20), t(6, 3), t(3, 20)]
    a, b, c, d, r = 2, 3, 4, 5, 2  # O = a·b = 6, I = c·d = 20
    w1 = [t(a, r), t(r, c)] if key[0] else [t(a, c)]
    return LOKR_RULES[key], w1 + ([t(b, r), t(r, d)] if key[1] else [t(b, d)])


def _plain_delta(algo: str, key, factors: list[torch.Tensor], scale: float) -> torch.Tensor:
    if algo == "loha":
        a1, b1, a2, b2 = factors
        return scale * (a1 @ b1) * (a2 @ b2)
    f = list(factors)
    w1 = f.pop(0) @ f.pop(0) if key[0] else f.pop(0)
    w2 = f[0] @ f[1] if key[1] else f[0]
    return scale * torch.kron(w1, w2)


@pytest.mark.parametrize("algo,key", RULES, ids=RULE_IDS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_rebuild_gradcheck_fp64(algo: str, key, with_bias: bool) -> None:
    g = torch.Generator().manual_seed(1)

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    rule, factors = _rule_and_factors(algo, key, t)
    x, w = t(2, 3, 20), t(6, 20)
    b = t(6) if with_bias else None
    scale = 0.6
    assert torch.autograd.gradcheck(
        lambda x, w, b, *f: RebuildLinear.apply(x, w, None, b, rule, scale, *f), (x, w, b, *factors)
    )
    ref = torch.nn.functional.linear(x, w, b) + x @ _plain_delta(algo, key, factors, scale).t()
    assert torch.allclose(rebuild_linear(x, w, b, rule, scale, factors), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("reduce_form", [False, True], ids=["batched_products", "reduce"])
def test_kron_grads_equal_autograd_fp64(reduce_form: bool) -> None:
    g = torch.Generator().manual_seed(2)
    w1 = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(5, 2, generator=g, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(15, 8, generator=g, dtype=torch.float64)
    ref = torch.autograd.grad(torch.kron(w1, w2), [w1, w2], grad)
    got = kron_grads(grad, w1.detach(), w2.detach(), (True, True), reduce_form)
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_factor_grads_come_back_in_their_own_dtype() -> None:
    """fp32 factors (the parameters) with fp64 activations: the casts and their grads run inside the node."""
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64)
    down = torch.randn(2, 6, requires_grad=True)
    up = torch.randn(5, 2, requires_grad=True)
    out = adapter_linear(x, w, None, down, up, 0.5)
    assert out.dtype == torch.float64
    gd, gu = torch.autograd.grad(out.sum(), [down, up])
    assert gd.dtype == gu.dtype == torch.float32
    ref = torch.autograd.grad((x @ w.t() + 0.5 * x @ down.double().t() @ up.double().t()).sum(), [down, up])
    assert torch.allclose(gd, ref[0], rtol=1e-6) and torch.allclose(gu, ref[1], rtol=1e-6)
    factors = [torch.randn(*shape, requires_grad=True) for shape in [(5, 2), (2, 6)] * 2]
    out = rebuild_linear(x, w, None, LOHA_RULE, 0.5, factors)
    grads = torch.autograd.grad(out.sum(), factors)
    assert [g.dtype for g in grads] == [torch.float32] * 4
    f64 = [f.detach().double().requires_grad_() for f in factors]
    ref = torch.autograd.grad((x @ (w + _plain_delta("loha", None, f64, 0.5)).t()).sum(), f64)
    for a, b in zip(grads, ref):
        assert torch.allclose(a.double(), b, rtol=1e-5, atol=1e-6)


def test_rebuild_shape_error_names_the_rule() -> None:
    x, w = torch.randn(2, 20), torch.randn(6, 21)
    with pytest.raises(ValueError, match="rebuild_linear: the loha factors give ΔW"):
        rebuild_linear(x, w, None, LOHA_RULE, 1.0, [torch.randn(6, 3), torch.randn(3, 20)] * 2)


def test_gradcheck_only_some_inputs_need_grad() -> None:
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64)
    down = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    up = torch.randn(5, 2, dtype=torch.float64)  # frozen up: only x and down get grads
    assert torch.autograd.gradcheck(lambda x, d: adapter_linear(x, w, None, d, up), (x, down))


def test_shape_errors_name_the_inputs() -> None:
    with pytest.raises(ValueError, match="adapter_linear: x .* do not fit"):
        adapter_linear(torch.randn(2, 6), torch.randn(5, 6), None, torch.randn(3, 6), torch.randn(5, 4))


@pytest.fixture(scope="module")
def model():
    return build_tiny_sdxl()


CASES = [
    (lora, {}),
    (lora, {"use_scalar": "true"}),
    (loha, {}),
    (lokr, {}),
    (lokr, {"factor": "4", "use_scalar": "true"}),
]


@pytest.mark.parametrize("masked", [True, False], ids=["rank_dropout", "no_mask"])
@pytest.mark.parametrize("module,kw", CASES)
def test_patched_layer_takes_the_fused_node_and_equals_plain_fp64(model, module, kw, masked) -> None:
    m = model.clone()
    drop = {"rank_dropout": "0.5"} if masked else {}
    net = module.create_network(1.0, 4, 3, None, None, m.unet, **drop, **kw)  # α 3 ≠ dim 4
    net.set_path_policy("rebuild", "eager")  # LoHa/LoKr: the rebuild path, where the fused node applies
    randomize(net)
    net.apply_to(None, m.unet, apply_text_encoder=False, apply_unet=True)
    m.unet.double().requires_grad_(False)
    net.to(torch.float64).train()
    net.on_step_start()
    linears = [a for a in net.unet_loras if not a.is_conv][:6]
    assert linears
    for sub in linears:
        base = sub.org_module
        x = torch.randn(2, 3, sub.in_dim, dtype=torch.float64, requires_grad=True)
        params = [p for p in sub.parameters() if p.requires_grad]
        # LoHa/LoKr build ΔW inside the node unless a mask or a trainable σ needs autograd outside it
        node = (
            "RebuildLinearBackward"
            if module is not lora and not masked and not kw
            else "AdapterLinearBackward"
        )
        fused = sub.fused_output(x)
        assert fused is not None, sub.lora_name
        assert fused.grad_fn is not None and type(fused.grad_fn).__name__ == node
        out = base(x)  # the patched forward
        assert out.grad_fn is not None and type(out.grad_fn).__name__ == node
        plain = torch.nn.functional.linear(x, base.weight, base.bias) + sub.delta_output(x)
        err, size = (out - plain).detach().abs().max(), plain.detach().abs().max()
        assert float(err) <= 1e-12 * float(size), sub.lora_name
        g = torch.randn_like(plain)
        for a, b in zip(
            torch.autograd.grad(out, [x, *params], g), torch.autograd.grad(plain, [x, *params], g)
        ):
            assert float((a - b).abs().max()) <= 1e-12 * (float(b.abs().max()) + 1e-30), sub.lora_name


def test_fused_node_steps_aside(model) -> None:
    m = model.clone()
    net = lora.create_network(1.0, 4, 2, None, None, m.unet, dropout="0.1", conv_dim="2")
    randomize(net)
    net.train()
    lin = next(a for a in net.unet_loras if not a.is_conv)
    conv = next(a for a in net.unet_loras if a.is_conv)
    x = torch.randn(2, lin.in_dim)
    lin.org_module.requires_grad_(False)
    assert lin.fused_output(x) is None  # neuron dropout is drawn on the host per call
    net.eval()
    assert lin.fused_output(x) is not None
    assert conv.fused_output(torch.randn(1, conv.in_dim, 4, 4)) is None  # convs keep their own path
    lin.org_module.weight.requires_grad_(True)
    assert lin.fused_output(x) is None  # a trained base weight: plain autograd owns its grad
    lin.org_module.requires_grad_(False)
    lin.multiplier = 0.0
    assert lin.fused_output(x) is None


@pytest.mark.parametrize("module", [lora, loha, lokr])
def test_bf16_autocast_matches_unfused(model, module) -> None:
    """bf16 weights and autocast as in training: the fused node equals base + branch to bf16 rounding,
    and the factors' grads stay fp32."""
    m = model.clone()
    net = module.create_network(1.0, 4, 2, None, None, m.unet)
    net.set_path_policy("rebuild", "eager")  # LoHa/LoKr: the rebuild path, where the fused node applies
    randomize(net)
    m.unet.to(torch.bfloat16).requires_grad_(False)
    net.train()
    net.on_step_start()
    sub = next(a for a in net.unet_loras if not a.is_conv and a.in_dim >= 32)
    base = sub.org_module
    x = torch.randn(4, 8, sub.in_dim)
    params = [p for p in sub.parameters() if p.requires_grad]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = sub.fused_output(x)
        plain = torch.nn.functional.linear(x, base.weight, base.bias) + sub.delta_output(x)
    assert fused.dtype == torch.bfloat16 and plain.dtype == torch.bfloat16
    scale = float(plain.detach().float().abs().max())
    assert float((fused.float() - plain.float()).detach().abs().max()) <= 2e-2 * scale
    g = torch.randn_like(plain)
    gf = torch.autograd.grad(fused, params, g)
    gp = torch.autograd.grad(plain, params, g)
    for a, b in zip(gf, gp):
        assert a.dtype == torch.float32
        assert float((a - b).abs().max()) <= 2e-2 * float(b.abs().max())
