"""The fused Linear + adapter nodes on an fp8 base (networks/fp8.py `--fp8_base`, plain and `--fp8_scaled`).

Proves: a patched fp8 Linear takes the `fused_node` / `fused` row (networks.paths) and its node; in fp64 its
output and every grad (x, the factors, a trained σ; with rank dropout too) equal the previous `add_branch`
path (the fp8 layer's own forward, then the branch accumulated into it) and the explicit formula on the
dequantized weight, to fp64 rounding; under bf16 autocast they match that path to bf16 rounding; the node
saves the fp8 weight and no 16-bit copy of it, and no more than the `add_branch` path saves; the nodes refuse
a scale beside a non-fp8 weight; `merged_forward` now also runs through the patched call of an fp8 layer;
torch.compile traces the node on an fp8 base in one graph.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from networks import fp8, loha, lokr, lora, paths
from networks.functional.fused_linear import adapter_linear, rebuild_linear
from networks.functional.loha import LOHA_RULE
from networks.modules.patching import original_forward
from tests.helpers.sdxl_network import build_tiny_sdxl, randomize

CASES = [
    (lora, {}, "fused_node", "AdapterLinearBackward"),
    (lora, {"use_scalar": "true"}, "fused", "AdapterLinearBackward"),
    (lora, {"rank_dropout": "0.5"}, "fused", "AdapterLinearBackward"),
    (loha, {}, "fused_node", "RebuildLinearBackward"),
    (loha, {"rank_dropout": "0.5"}, "fused", "AdapterLinearBackward"),
    (lokr, {"factor": "4"}, "fused_node", "RebuildLinearBackward"),
    (lokr, {"factor": "4", "use_scalar": "true"}, "fused", "AdapterLinearBackward"),
]
IDS = ["lora", "lora-sigma", "lora-rankdrop", "loha", "loha-rankdrop", "lokr", "lokr-sigma"]


@pytest.fixture(scope="module")
def model():
    return build_tiny_sdxl()


def _fp8_network(model, module, kw: dict, scaled: bool, dtype: torch.dtype):
    """A network on the tiny U-Net whose base weights were converted to fp8 first, as the trainers do."""
    m = model.clone()
    m.unet.to(dtype).requires_grad_(False)  # before the conversion: Module.to would upcast fp8 weights
    assert fp8.apply_fp8_base(m.unet, scaled) > 0
    net = module.create_network(1.0, 4, 3, None, None, m.unet, **kw)  # α 3 ≠ dim 4
    net.set_path_policy("rebuild", "eager")  # LoHa/LoKr: the unfactored path, where the fused rows apply
    randomize(net)
    net.apply_to(None, m.unet, apply_text_encoder=False, apply_unet=True)
    net.to(dtype).train()
    net.on_step_start()
    return net


def _old_path(sub, x: torch.Tensor) -> torch.Tensor:
    """What the patched call of an fp8 Linear computed before: its own forward, then `add_branch`."""
    assert paths.branch_path(sub, x) == "add_branch"
    return sub.add_branch(x, original_forward(sub.org_module)(x))


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(out, inputs, g)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max()) / (float(b.abs().max()) + 1e-300)


@pytest.mark.parametrize("scaled", [False, True], ids=["fp8", "fp8_scaled"])
@pytest.mark.parametrize("module,kw,row,node", CASES, ids=IDS)
def test_fp8_linear_takes_the_fused_node_and_equals_add_branch_fp64(
    model, module, kw, row, node, scaled
) -> None:
    net = _fp8_network(model, module, kw, scaled, torch.float64)
    linears = [a for a in net.unet_loras if not a.is_conv][:4]
    assert linears
    for sub in linears:
        base = sub.org_module
        assert fp8.is_fp8_layer(base) and (fp8.layer_scale(base) is not None) == scaled
        x = torch.randn(2, 3, sub.in_dim, dtype=torch.float64, requires_grad=True)
        assert paths.forward_path(sub, x) == row, sub.lora_name
        params = [p for p in sub.parameters() if p.requires_grad]
        # a trained σ is among the inputs whose grads are compared
        assert (sub.scalar is not None) == ("use_scalar" in kw)
        assert sub.scalar is None or any(p is sub.scalar for p in params)
        out = base(x)  # the patched forward
        assert type(out.grad_fn).__name__ == node, sub.lora_name
        old = _old_path(sub, x)
        w = fp8.dequantize(base.weight, fp8.layer_scale(base), torch.float64)
        formula = F.linear(x, w, base.bias) + sub.delta_output(x)
        g = torch.randn_like(out)
        got = _grads(out, [x, *params], g)
        for ref in (old, formula):
            assert _rel_err(out, ref) <= 1e-13, sub.lora_name
            for a, b in zip(got, _grads(ref, [x, *params], g)):
                assert _rel_err(a, b) <= 1e-12, sub.lora_name


class _Saved:
    """Every tensor autograd saves while active (a saved-tensors hook), as (dtype, shape, storage pointer)."""

    def __init__(self) -> None:
        self.rows: list[tuple[torch.dtype, tuple[int, ...], int, torch.Tensor]] = []
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.rows.append((t.dtype, tuple(t.shape), t.untyped_storage().data_ptr(), t))
        return t

    def __enter__(self) -> _Saved:
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.__exit__(*exc)

    def bytes(self) -> int:
        """Bytes of the distinct storages saved (a tensor saved twice counts once)."""
        seen = {(ptr, t.untyped_storage().nbytes()) for _, _, ptr, t in self.rows}
        return sum(n for _, n in seen)


@pytest.mark.parametrize("scaled", [False, True], ids=["fp8", "fp8_scaled"])
@pytest.mark.parametrize("module,kw,row,node", CASES, ids=IDS)
def test_bf16_autocast_matches_add_branch_and_saves_fp8(model, module, kw, row, node, scaled) -> None:
    """As in training (fp32 factors, bf16 autocast): equal to the old path to bf16 rounding (grad x here is
    one rounding of g·W + branch, there two roundings and a bf16 sum), factors' grads in fp32; the node saves
    the fp8 weight itself, never its dequantized 16-bit copy, and at most what the old path saves."""
    net = _fp8_network(model, module, kw, scaled, torch.float32)
    sub = next(a for a in net.unet_loras if not a.is_conv and a.in_dim >= 32)
    base = sub.org_module
    w8 = base.weight
    x = torch.randn(4, 8, sub.in_dim, requires_grad=True)
    params = [p for p in sub.parameters() if p.requires_grad]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert paths.forward_path(sub, x) == row
        with _Saved() as fused_saved:
            out = base(x)
        with _Saved() as old_saved:
            old = _old_path(sub, x)
    assert type(out.grad_fn).__name__ == node
    assert out.dtype == old.dtype == torch.bfloat16
    assert _rel_err(out, old) <= 2e-2
    g = torch.randn_like(out)
    for a, b in zip(_grads(out, [x, *params], g), _grads(old, [x, *params], g)):
        assert a.dtype == b.dtype
        assert _rel_err(a, b) <= 2e-2
    # the fp8 weight is what the node keeps of W
    assert any(d == w8.dtype and p == w8.untyped_storage().data_ptr() for d, _, p, _ in fused_saved.rows)
    w16 = fp8.dequantize(w8, fp8.layer_scale(base), torch.bfloat16)

    def weight_sized(saved: _Saved) -> list[torch.Tensor]:
        return [t for d, shape, _, t in saved.rows if shape == tuple(w8.shape) and d != w8.dtype]

    assert not any(torch.equal(t, w16) for t in weight_sized(fused_saved))  # never the dequantized W
    # LoRA saves nothing of W's size; LoHa/LoKr save their ΔW (and its cast) as the old path does
    if module is lora:
        assert weight_sized(fused_saved) == []
    assert len(weight_sized(fused_saved)) <= len(weight_sized(old_saved))
    assert fused_saved.bytes() <= old_saved.bytes()


def test_nodes_take_an_fp8_pair_and_refuse_a_scale_on_a_float_weight() -> None:
    """The functional nodes with (fp8, scale): the explicit formula on the dequantized weight, in fp64."""
    g = torch.Generator().manual_seed(3)
    w8, scale = fp8.quantize(torch.randn(6, 20, generator=g, dtype=torch.float64), scaled=True)
    w = fp8.dequantize(w8, scale, torch.float64)
    x = torch.randn(2, 3, 20, generator=g, dtype=torch.float64, requires_grad=True)
    down = torch.randn(3, 20, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    out = adapter_linear(x, (w8, scale), b, down, up, 0.7)
    ref = F.linear(x, w, b) + 0.7 * (x @ down.t() @ up.t())
    gy = torch.randn_like(ref)
    assert _rel_err(out, ref) <= 1e-13
    for a, c in zip(_grads(out, [x, down, up], gy), _grads(ref, [x, down, up], gy)):
        assert _rel_err(a, c) <= 1e-12
    factors = [
        torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in [(6, 2), (2, 20)] * 2
    ]
    out = rebuild_linear(x, (w8, None), b, LOHA_RULE, 0.7, factors)
    w_plain = w8.to(torch.float64)
    ref = F.linear(x, w_plain + 0.7 * (factors[0] @ factors[1]) * (factors[2] @ factors[3]), b)
    assert _rel_err(out, ref) <= 1e-13
    for a, c in zip(_grads(out, [x, *factors], gy), _grads(ref, [x, *factors], gy)):
        assert _rel_err(a, c) <= 1e-12
    with pytest.raises(ValueError, match="adapter_linear: a weight scale comes only with an fp8 weight"):
        adapter_linear(x, (w, scale), b, down, up, 0.7)


@pytest.mark.parametrize("module", [lora, loha])
def test_merged_forward_runs_through_a_patched_fp8_layer(model, module) -> None:
    """fp8's upcasting forward counts as the layer's plain call: `merged_forward` (LoHa, Linear and conv)
    replaces it, equal to the old path in fp64; LoRA's merged node wants a ≥ 16-bit weight, so an fp8 Linear
    takes the fused node instead."""
    net = _fp8_network(model, module, {"merged_forward": "True", "conv_dim": "2"}, True, torch.float64)
    lin = next(a for a in net.unet_loras if not a.is_conv)
    conv = next(a for a in net.unet_loras if a.is_conv)
    x = torch.randn(2, lin.in_dim, dtype=torch.float64)
    # merged forms W + ΔW in fp32 for an fp8 weight (fp64 only for an fp64 one): equal to fp32 rounding
    tol = 1e-6 if module is loha else 1e-13
    assert paths.forward_path(lin, x) == ("merged" if module is loha else "fused_node")
    out = lin.org_module(x)
    assert type(out.grad_fn).__name__ == ("AddmmBackward0" if module is loha else "AdapterLinearBackward")
    assert _rel_err(out, _old_path(lin, x)) <= tol
    xc = torch.randn(1, conv.in_dim, 4, 4, dtype=torch.float64)
    assert paths.forward_path(conv, xc) == ("merged" if module is loha else "branch")
    out = conv.org_module(xc)
    assert type(out.grad_fn).__name__ == ("ConvolutionBackward0" if module is loha else "AddBackward0")
    assert _rel_err(out, conv.add_branch(xc, original_forward(conv.org_module)(xc))) <= tol


@pytest.mark.parametrize("module", [lora, lokr])
def test_fused_fp8_node_traces_in_one_graph(model, module) -> None:
    """torch.compile (aot_eager, fullgraph: no break at the (fp8, scale) pair) equals eager in fp64."""
    net = _fp8_network(model, module, {"factor": "4"} if module is lokr else {}, True, torch.float64)
    sub = next(a for a in net.unet_loras if not a.is_conv)
    layer = sub.org_module
    x = torch.randn(2, 3, sub.in_dim, dtype=torch.float64, requires_grad=True)
    params = [x, *(p for p in sub.parameters() if p.requires_grad)]
    eager = layer(x)
    assert type(eager.grad_fn).__name__ in ("AdapterLinearBackward", "RebuildLinearBackward")
    compiled = torch.compile(lambda t: layer(t), backend="aot_eager", fullgraph=True)(x)
    g = torch.randn_like(eager)
    assert _rel_err(compiled, eager) <= 1e-13
    for a, b in zip(_grads(compiled, params, g), _grads(eager, params, g)):
        assert _rel_err(a, b) <= 1e-12


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_fp8_linear_without_grads_skips_the_node_with_the_same_bits(scaled, autocast) -> None:
    """Where nothing can be differentiated (no grad mode, or neither x nor the bias needs a grad) the fp8
    Linear's forward runs the node's own maths without the node: the same bits, no graph."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 16)
    fp8.apply_fp8_base(lin, scaled=scaled)
    lin.requires_grad_(False)
    x = torch.randn(3, 5, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y_node = lin(x)
        y_plain = lin(x.detach())
        with torch.no_grad():
            y_nograd = lin(x)
        lin.bias.requires_grad_(True)
        y_bias = lin(x.detach())
    assert type(y_node.grad_fn).__name__ == "_Fp8LinearBackward"
    assert type(y_bias.grad_fn).__name__ == "_Fp8LinearBackward"  # a trained bias keeps the node
    assert y_plain.grad_fn is None and y_nograd.grad_fn is None
    assert y_node.dtype == (torch.bfloat16 if autocast else torch.float32)
    for y in (y_plain, y_nograd, y_bias):
        assert torch.equal(y.detach(), y_node.detach())
