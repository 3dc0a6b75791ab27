"""Forward semantics on the tiny SDXL (spec networks.md §3.6, §4): zero at init, m = 0 / disabled →
bitwise base, merge = unmerged forward, save → load → identical, file key set / alpha / σ baking."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from networks import loha, lokr, lora
from tests.helpers.sdxl_network import build_tiny_sdxl, randomize, run_tes, run_unet, unet_inputs

CASES = [
    (lora, {}),
    (lora, {"conv_dim": 2, "conv_alpha": 3}),
    (loha, {}),
    (loha, {"conv_dim": 2, "conv_alpha": 3}),
    (loha, {"conv_dim": 2, "use_tucker": True}),
    (loha, {"use_scalar": True, "conv_dim": 2}),
    (lokr, {"factor": 4}),
    (lokr, {"conv_dim": 2, "use_tucker": True, "factor": 4}),
    (lokr, {"conv_dim": 2, "decompose_both": True, "factor": 2}),
    (lokr, {"use_scalar": True, "conv_dim": 2}),
]
IDS = [
    f"{m.__name__.split('.')[-1]}-{'-'.join(f'{k}{v}' for k, v in kw.items()) or 'plain'}" for m, kw in CASES
]


@pytest.fixture(scope="module")
def model():
    return build_tiny_sdxl()


@pytest.fixture(scope="module")
def inputs():
    return unet_inputs()


@pytest.fixture(scope="module")
def base_out(model, inputs):
    return run_unet(model.unet, inputs), run_tes(model)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("module,kwargs", CASES, ids=IDS)
def test_init_m0_disabled_bitwise(model, inputs, base_out, module, kwargs) -> None:
    m = model.clone()
    net = module.create_network(1.0, 4, 2, None, m.tes, m.unet, **kwargs)
    net.apply_to(m.tes, m.unet)
    try:
        assert torch.equal(run_unet(m.unet, inputs), base_out[0])  # ΔW is exactly 0 at init
        assert all(torch.equal(a, b) for a, b in zip(run_tes(m), base_out[1]))
        randomize(net)
        changed = run_unet(m.unet, inputs)
        assert _rel(changed, base_out[0]) > 1e-4
        net.set_multiplier(0.0)
        assert torch.equal(run_unet(m.unet, inputs), base_out[0])
        net.set_multiplier(1.0)
        net.set_enabled(False)
        assert torch.equal(run_unet(m.unet, inputs), base_out[0])
        net.set_enabled(True)
        assert torch.equal(run_unet(m.unet, inputs), changed)
    finally:
        net.remove_from()
    assert torch.equal(run_unet(m.unet, inputs), base_out[0])  # unpatched layers are the base again


@pytest.mark.parametrize("module,kwargs", CASES, ids=IDS)
def test_save_load_merge_roundtrip(tmp_path, model, inputs, base_out, module, kwargs) -> None:
    m = model.clone()
    net = module.create_network(1.0, 4, 3, None, m.tes, m.unet, **kwargs)  # α ≠ dim
    net.apply_to(m.tes, m.unet)
    randomize(net)
    path = tmp_path / "net.safetensors"
    net.save_weights(str(path), None, {"ss_network_module": module.__name__, "note": "kept"})
    outs = {}
    for mult in (0.5, 1.0, 1.7):
        net.set_multiplier(mult)
        outs[mult] = run_unet(m.unet, inputs), run_tes(m)
    net.remove_from()

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        alphas = [f.get_tensor(k) for k in keys if k.endswith(".alpha")]
    assert meta["ss_network_module"] == module.__name__ and meta["note"] == "kept"
    assert len(meta["sshs_model_hash"]) == 64 and len(meta["sshs_legacy_hash"]) == 8
    assert keys == set(net.file_state_dict())
    assert not any(k.endswith((".scalar", ".dora_scale", ".lokr_t1")) for k in keys)
    assert all(a.dtype == torch.float32 and a.dim() == 0 and float(a) != 0 for a in alphas)

    # reload into hooks (resume / gen_img path): identical, σ-baked files to rounding
    m2 = model.clone()
    net2, sd = module.create_network_from_weights(1.0, str(path), None, m2.tes, m2.unet, for_inference=True)
    net2.apply_to(m2.tes, m2.unet)
    net2.load_weights(str(path))
    for mult, (want_unet, want_tes) in outs.items():
        net2.set_multiplier(mult)
        got_unet, got_tes = run_unet(m2.unet, inputs), run_tes(m2)
        if kwargs.get("use_scalar"):
            assert _rel(got_unet, want_unet) <= 1e-6
        else:
            assert torch.equal(got_unet, want_unet)
            assert all(torch.equal(a, b) for a, b in zip(got_tes, want_tes))
    net2.remove_from()
    # merge into the base weights (fp32 maths, cast once) equals the unmerged forward
    for mult, (want_unet, want_tes) in outs.items():
        m2.unet.load_state_dict(model.unet.state_dict())
        for te, base_te in zip(m2.tes, model.tes):
            te.load_state_dict(base_te.state_dict())
        net3, sd = module.create_network_from_weights(
            mult, str(path), None, m2.tes, m2.unet, for_inference=True
        )
        net3.merge_to(m2.tes, m2.unet, sd)
        assert _rel(run_unet(m2.unet, inputs), want_unet) <= 1e-5
        assert all(_rel(a, b) <= 1e-5 for a, b in zip(run_tes(m2), want_tes))


def test_use_scalar_is_baked(tmp_path, model) -> None:
    m = model.clone()
    for module, bake in ((loha, "hada_w1_a"), (lokr, "lokr_w1"), (lora, "lora_up.weight")):
        net = module.create_network(1.0, 4, 2, None, None, m.unet, use_scalar=True)
        randomize(net)
        sub = net.unet_loras[0]
        assert sub.scalar is not None and float(sub.scalar.detach()) == pytest.approx(0.7)
        sd = net.file_state_dict()
        key = f"{sub.lora_name}.{bake}"
        assert torch.allclose(sd[key], sub.get_parameter(bake).detach() * 0.7)
        dw = sub.delta_weight_scaled(sub.total_scale(1.0)).detach()
        net2, _ = module.create_network_from_weights(1.0, None, None, None, m.unet, weights_sd=sd)
        net2.load_weights(sd)
        sub2 = net2.unet_loras[0]
        assert sub2.scalar is None
        assert torch.allclose(sub2.delta_weight_scaled(sub2.total_scale(1.0)), dw, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_save_dtype_keeps_alpha_fp32(tmp_path, model, dtype) -> None:
    net = loha.create_network(1.0, 4, 0.3, None, None, model.unet)
    randomize(net)
    path = tmp_path / "w.safetensors"
    net.save_weights(str(path), dtype, {})
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            if k.endswith(".alpha"):
                assert t.dtype == torch.float32 and t.dim() == 0 and float(t) == pytest.approx(0.3, abs=1e-7)
            else:
                assert t.dtype == dtype


def test_lokr_both_full_alpha_is_rank(model) -> None:
    net = lokr.create_network(1.0, 8, 2, None, None, model.unet)
    full = [s for s in net.unet_loras if s.lokr_layout.both_full]
    low = [s for s in net.unet_loras if not s.lokr_layout.both_full]
    assert full and low
    sd = net.file_state_dict()
    assert all(float(sd[f"{s.lora_name}.alpha"]) == 8.0 and s.scale == 1.0 for s in full)
    assert all(float(sd[f"{s.lora_name}.alpha"]) == 2.0 and s.scale == 0.25 for s in low)


def test_two_networks_stack_and_unwind_in_any_order(model, inputs, base_out) -> None:
    m = model.clone()
    a = loha.create_network(1.0, 4, 2, None, None, m.unet)
    b = lokr.create_network(0.5, 4, 2, None, None, m.unet, factor=4)
    a.apply_to(None, m.unet)
    randomize(a, seed=5)
    ya = run_unet(m.unet, inputs)
    b.apply_to(None, m.unet)
    randomize(b, seed=6)
    yab = run_unet(m.unet, inputs)
    a.remove_from()
    yb = run_unet(m.unet, inputs)
    assert _rel(yab, ya) > 1e-4 and _rel(yb, base_out[0]) > 1e-4
    b.remove_from()
    assert torch.equal(run_unet(m.unet, inputs), base_out[0])
    a.apply_to(None, m.unet)
    with pytest.raises(RuntimeError, match="already applied"):
        a.apply_to(None, m.unet)
    assert torch.equal(run_unet(m.unet, inputs), ya)
    # the other unwinding order: b on top of a, then b removed first → exactly a alone again
    b.apply_to(None, m.unet)
    assert torch.equal(run_unet(m.unet, inputs), yab)
    # per layer the chain is y = base(x) + Σ_k m_k·ΔW_k·x
    sa, sb = a.unet_loras[0], next(x for x in b.unet_loras if x.org_module is a.unet_loras[0].org_module)
    leaf = sa.org_module
    x = torch.randn(3, leaf.in_features)
    with torch.no_grad():
        base = torch.nn.functional.linear(x, leaf.weight, leaf.bias)
        want = base + x @ sa.delta_weight(1.0).T + x @ sb.delta_weight(0.5).T
        assert torch.allclose(leaf(x), want, rtol=1e-5, atol=1e-6) and not torch.allclose(leaf(x), base)
    b.remove_from()
    assert torch.equal(run_unet(m.unet, inputs), ya)
    a.remove_from()
    assert torch.equal(run_unet(m.unet, inputs), base_out[0])


def test_apply_to_drops_disabled_half(model, tmp_path) -> None:
    m = model.clone()
    net = lora.create_network(1.0, 4, 1, None, m.tes, m.unet)
    net.apply_to(m.tes, m.unet, apply_text_encoder=False, apply_unet=True)
    assert not net.text_encoder_loras
    assert all(k.startswith("lora_unet_") for k in net.state_dict())
    net.save_weights(str(tmp_path / "u.safetensors"), None, None)
    with safe_open(str(tmp_path / "u.safetensors"), framework="pt") as f:
        assert all(k.startswith("lora_unet_") for k in f.keys())
    net.remove_from()


def test_network_cast_to_bf16_saves_bf16_factors_and_fp32_alpha(model) -> None:
    net = lokr.create_network(1.0, 4, 2, None, None, model.unet, use_scalar=True)
    randomize(net)
    net.to(torch.bfloat16)
    sd = net.file_state_dict(None)
    assert {v.dtype for k, v in sd.items() if not k.endswith(".alpha")} == {torch.bfloat16}
    assert {(v.dtype, v.dim()) for k, v in sd.items() if k.endswith(".alpha")} == {(torch.float32, 0)}


def test_tiny_sdxl_builders_are_deterministic() -> None:
    a, b = build_tiny_sdxl(), build_tiny_sdxl()
    inputs = unet_inputs()
    assert torch.equal(run_unet(a.unet, inputs), run_unet(b.unet, inputs))
    ya, yb = run_tes(a), run_tes(b)
    assert all(torch.equal(p, q) for p, q in zip(ya, yb))
