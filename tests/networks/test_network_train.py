"""Training-time behaviour: deterministic dropout (spec §3.5), max-norm regularisation (§1.5),
strict loading errors, merge helpers for inference (§4.2)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from networks import loha, lokr, lora
from networks.network_io import detect_algorithm
from tests.helpers.sdxl_network import build_tiny_sdxl, randomize, run_unet, unet_inputs


@pytest.fixture(scope="module")
def model():
    return build_tiny_sdxl()


def _leaf_net(model, module=loha, **kw):
    m = model.clone()
    net = module.create_network(1.0, 4, 2, None, None, m.unet, **kw)
    randomize(net)
    return m, net


def test_dropout_same_on_recompute_and_ranks_and_differs_per_step(model) -> None:
    kw = {"rank_dropout": "0.5", "module_dropout": "0.3", "dropout": "0.2"}
    m1, a = _leaf_net(model, **kw)
    m2, b = _leaf_net(model, **kw)  # a second "rank": same seed, same step counter
    for net in (a, b):
        net.set_dropout_seed(1234)
        net.train()
    x = torch.randn(3, 5, 64)
    outs = []
    for _step in range(6):
        a.on_step_start()
        b.on_step_start()
        sub_a = a.unet_loras[3]
        ya = sub_a.delta_output(x)
        torch.rand(10)  # global RNG use in between must not matter
        ya2 = sub_a.delta_output(x)  # recompute (gradient checkpointing) → same draws
        yb = b.unet_loras[3].delta_output(x)
        assert (ya is None) == (ya2 is None) == (yb is None)
        if ya is not None:
            assert torch.equal(ya, ya2) and torch.equal(ya, yb)
        outs.append(ya)
    kept = [o for o in outs if o is not None]
    assert len(kept) >= 2 and not torch.equal(kept[0], kept[1])  # new masks each step


def test_dropout_grads_match_under_checkpoint_without_rng_restore(model) -> None:
    m, net = _leaf_net(model, rank_dropout="0.5", dropout="0.3")
    net.train()
    net.on_step_start()
    sub = net.unet_loras[5]
    x = torch.randn(2, 4, sub.in_dim)

    def f(inp):
        return sub(inp).square().sum()

    loss = f(x)
    plain = torch.autograd.grad(loss, list(sub.parameters()))
    loss_ck = checkpoint(f, x, use_reentrant=False, preserve_rng_state=False)
    ck = torch.autograd.grad(loss_ck, list(sub.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(plain, ck))


def test_rank_dropout_keeps_the_mean_and_is_off_in_eval(model) -> None:
    m, net = _leaf_net(model, rank_dropout="0.5")
    sub = net.unet_loras[2]
    x = torch.randn(4, sub.in_dim, dtype=torch.float32)
    net.eval()
    with torch.no_grad():
        ref = sub.delta_output(x)
        net.train()
        acc = torch.zeros_like(ref)
        n = 400
        for _ in range(n):
            net.on_step_start()
            acc += sub.delta_output(x)
    assert float((acc / n - ref).norm() / ref.norm()) < 0.1
    # one step: whole output channels are dropped, the same ones for every row, the rest scaled by 1/(1-p)
    with torch.no_grad():
        net.on_step_start()
        one = sub.delta_output(x)
    kept = (one != 0).all(dim=0)
    assert bool(((one == 0).all(dim=0) | kept).all()) and 0 < int(kept.sum()) < sub.out_dim
    assert torch.allclose(one[:, kept], 2.0 * ref[:, kept], rtol=1e-6, atol=0)
    net.eval()
    with torch.no_grad():
        assert torch.equal(sub.delta_output(x), ref)


def test_rank_dropout_masks_come_from_one_buffer_at_a_fixed_address(model) -> None:
    """on_step_start fills one buffer (a CUDA graph replays reads of it); it equals each module's own CPU draw."""
    m, net = _leaf_net(model, rank_dropout="0.4")
    net.set_dropout_seed(7)
    net.train()
    mods = net.unet_loras
    net.on_step_start()
    ptrs = [sub.rank_scale.data_ptr() for sub in mods]
    buf_ptr = net._rank_mask_buffer.data_ptr()
    seen = []
    for _step in range(3):
        for sub in mods:
            assert sub.rank_scale_step == net.clock.step
            assert torch.equal(sub.rank_scale, sub.rank_keep_scale_cpu())
            assert set(sub.rank_scale.unique().tolist()) <= {0.0, float(torch.tensor(1.0) / 0.6)}
        seen.append(mods[0].rank_scale.clone())
        x = torch.randn(2, mods[0].in_dim)
        with torch.no_grad():  # the forward reads the buffer: same as the lazily drawn mask
            via_buffer = mods[0].delta_output(x)
            mods[0].rank_scale_step = -1
            lazy = mods[0].delta_output(x)
            mods[0].rank_scale_step = net.clock.step
        assert torch.equal(via_buffer, lazy)
        net.on_step_start()
        assert [sub.rank_scale.data_ptr() for sub in mods] == ptrs
        assert net._rank_mask_buffer.data_ptr() == buf_ptr
    assert not torch.equal(seen[0], seen[1])


@pytest.mark.parametrize(
    "module,kw",
    [(lora, {}), (loha, {}), (lokr, {}), (lokr, {"factor": "4"})],
)
def test_fused_add_equals_base_plus_branch_in_fp64(model, module, kw) -> None:
    """The addmm (β = 1) accumulation of the branch into the base output equals base + drop(ΔW·x), grads too."""
    m, net = _leaf_net(model, module, rank_dropout="0.5", **kw)
    net.set_path_policy(
        "rebuild", "eager"
    )  # the fused add is taken on the rebuild path (and always for LoRA)
    net.to(torch.float64).train()
    net.on_step_start()
    linears = [a for a in net.unet_loras if not a.is_conv]
    assert linears
    for sub in linears[:6]:
        base = sub.org_module.double()
        x = torch.randn(2, 3, sub.in_dim, dtype=torch.float64, requires_grad=True)
        params = [p for p in sub.parameters() if p.requires_grad]
        fused = sub.add_branch(x, torch.nn.functional.linear(x, base.weight, base.bias))
        plain = torch.nn.functional.linear(x, base.weight, base.bias) + sub.delta_output(x)
        err, size = (fused - plain).detach().abs().max(), plain.detach().abs().max()
        assert float(err) <= 1e-12 * float(size)
        g = torch.randn_like(plain)
        gf = torch.autograd.grad(fused, [x, *params], g)
        gp = torch.autograd.grad(plain, [x, *params], g)
        for a, b in zip(gf, gp):
            assert float((a - b).abs().max()) <= 1e-12 * (float(b.abs().max()) + 1e-30)
        assert sub.linear_factors(x, 1.0) is not None  # the fused path was the one taken


@pytest.mark.parametrize("module,kw", [(lora, {}), (loha, {}), (lokr, {"factor": "4"})])
def test_device_module_dropout_equals_host_decisions_fp64(model, module, kw) -> None:
    """use_device_module_dropout (CUDA graphs, torch.compile): the same per-step decisions as the host path,
    read from the step buffer as a ×0/1 factor; outputs equal, a dropped module's grads are zero (not none)."""
    _, host = _leaf_net(model, module, module_dropout="0.5", rank_dropout="0.3", **kw)
    m_dev, dev = _leaf_net(model, module, module_dropout="0.5", rank_dropout="0.3", **kw)
    dev.use_device_module_dropout()
    dev.apply_to(None, m_dev.unet, apply_text_encoder=False, apply_unet=True)
    m_dev.unet.double().requires_grad_(False)
    for net in (host, dev):
        net.to(torch.float64).train()
        net.set_dropout_seed(7)
    seen = set()
    for _step in range(8):
        host.on_step_start()
        dev.on_step_start()
        for i in (0, 3, 7):
            a, b = host.unet_loras[i], dev.unet_loras[i]
            x = torch.randn(2, a.in_dim, 3, 3) if a.is_conv else torch.randn(2, 3, a.in_dim)
            x = x.double()
            want = a.delta_output(x)
            seen.add(want is None)
            params = [p for p in b.parameters() if p.requires_grad]
            plain = (
                torch.nn.functional.linear(x, b.org_module.weight, b.org_module.bias)
                if not b.is_conv
                else None
            )
            got = b.delta_output(x)
            assert got is not None  # the device path always computes the branch
            assert (
                torch.equal(got, torch.zeros_like(got))
                if want is None
                else torch.allclose(got, want, atol=1e-12)
            )
            if plain is not None:  # the patched layer (fused node) agrees too
                layer = b.org_module(x)
                ref = plain if want is None else plain + want
                assert torch.allclose(layer, ref, atol=1e-12)
                grads = torch.autograd.grad(layer.square().sum(), params)
                assert all(float(g.abs().max()) == 0.0 for g in grads) == (want is None)
    assert seen == {True, False}  # both decisions happened


def test_module_dropout_rate(model) -> None:
    m, net = _leaf_net(model, module_dropout="0.25")
    net.train()
    sub = net.unet_loras[0]
    x = torch.randn(1, sub.in_dim)
    dropped = 0
    for _ in range(400):
        net.on_step_start()
        dropped += sub.delta_output(x) is None
    assert 0.18 < dropped / 400 < 0.32


@pytest.mark.parametrize(
    "module,kw", [(loha, {}), (lokr, {"factor": "4"}), (lokr, {"use_scalar": "true"}), (lora, {})]
)
def test_max_norm_regularization(model, module, kw) -> None:
    m, net = _leaf_net(model, module, **kw)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(4.0)
    before = [float(s.delta_weight_scaled(s.total_scale(1.0)).detach().norm()) for s in net.unet_loras]
    for s, n in zip(net.unet_loras, before):  # LoKr norm = ‖W1‖·‖W2‖·s without the Kronecker product
        assert float(s.norm_for_max()) == pytest.approx(n, rel=1e-5)
    max_norm = sorted(before)[len(before) // 2]
    keys_scaled, mean_norm, max_seen = net.apply_max_norm_regularization(max_norm, "cpu")
    after = [float(s.delta_weight_scaled(s.total_scale(1.0)).detach().norm()) for s in net.unet_loras]
    assert keys_scaled == sum(1 for n in before if n > max_norm)
    assert all(a <= max_norm * (1 + 1e-5) for a in after)
    assert all(a == pytest.approx(b, rel=1e-6) for a, b in zip(after, before) if b <= max_norm)
    # the reported norms are the real post-scale ‖ΔW‖ (the max/2 clamp only guards the ratio)
    assert mean_norm == pytest.approx(sum(after) / len(after), rel=1e-5)
    assert max_seen == pytest.approx(max(after), rel=1e-5)
    # at init (ΔW = 0) nothing is scaled and the mean norm is 0, not max/2
    fresh = module.create_network(1.0, 4, 2, None, None, model.clone().unet, **kw)
    assert fresh.apply_max_norm_regularization(1.0, "cpu") == (0, 0.0, 0.0)


def _saved(tmp_path, model, module=loha, **kw):
    m, net = _leaf_net(model, module, **kw)
    path = tmp_path / f"{module.__name__}.safetensors"
    net.save_weights(str(path), None, None)
    return net, path


def test_load_weights_errors_name_the_key(tmp_path, model) -> None:
    net, path = _saved(tmp_path, model)
    sd = net.file_state_dict()
    name = net.unet_loras[0].lora_name
    missing = dict(sd)
    del missing[f"{name}.hada_w2_b"]
    with pytest.raises(KeyError, match=f"{name}.hada_w2_b: missing"):
        net.load_weights(missing)
    extra = dict(sd)
    extra[f"{name}.hada_t1"] = torch.zeros(1)
    with pytest.raises(KeyError, match=f"{name}.hada_t1: unexpected key"):
        net.load_weights(extra)
    stranger = dict(sd)
    stranger["lora_unet_nowhere.alpha"] = torch.tensor(1.0)
    with pytest.raises(KeyError, match="lora_unet_nowhere.alpha: unexpected key"):
        net.load_weights(stranger)
    shaped = dict(sd)
    shaped[f"{name}.hada_w1_a"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=f"{name}.hada_w1_a: shape \\(3, 3\\)"):
        net.load_weights(shaped)
    net.load_weights(str(path))  # the real file loads


def test_from_weights_errors_name_the_key(tmp_path, model) -> None:
    net, path = _saved(tmp_path, model)
    sd = net.file_state_dict()
    name = net.unet_loras[0].lora_name
    with pytest.raises(KeyError, match="lora_unet_nowhere.alpha: no layer named"):
        loha.create_network_from_weights(
            1.0, None, None, None, model.unet, weights_sd={**sd, "lora_unet_nowhere.alpha": torch.tensor(1.0)}
        )
    with pytest.raises(KeyError, match=f"{name}.oft_blocks: unsupported network key"):
        detect_algorithm(name, {"oft_blocks": 1, "alpha": 1})
    bad = {k: v for k, v in sd.items() if not k.startswith(name + ".")}
    bad[f"{name}.hada_w1_a"] = sd[f"{name}.hada_w1_a"]
    bad[f"{name}.alpha"] = sd[f"{name}.alpha"]
    with pytest.raises(KeyError, match=f"{name}.hada_w1_b: missing"):
        loha.create_network_from_weights(1.0, None, None, None, model.unet, weights_sd=bad)
    wrong = dict(sd)
    wrong[f"{name}.hada_w1_b"] = torch.zeros(4, 7)
    with pytest.raises(ValueError, match=f"{name}.hada_w1_b: shape \\(4, 7\\)"):
        loha.create_network_from_weights(1.0, None, None, None, model.unet, weights_sd=wrong)


def test_cross_algorithm_files_and_factor_from_shapes(tmp_path, model) -> None:
    # networks.loha loads LoKr/LoRA files; LoKr factor/rank/α come from the shapes, never from kwargs
    net, path = _saved(tmp_path, model, lokr, factor="8")
    other, _ = loha.create_network_from_weights(1.0, str(path), None, None, model.unet)
    assert {type(s).__name__ for s in other.unet_loras} == {"LoKrModule"}
    mine = {s.lora_name: s for s in net.unet_loras}
    assert {s.lora_name: s.lokr_layout for s in other.unet_loras} == {
        k: s.lokr_layout for k, s in mine.items()
    }
    other.load_weights(str(path))
    for a in other.unet_loras:
        b = mine[a.lora_name]
        assert torch.equal(
            a.delta_weight_scaled(a.total_scale(1.0)), b.delta_weight_scaled(b.total_scale(1.0))
        )


def test_alpha_missing_or_zero(model, caplog) -> None:
    m, net = _leaf_net(model, lora)
    sd = net.file_state_dict()
    name = net.unet_loras[0].lora_name
    no_alpha = {k: v for k, v in sd.items() if k != f"{name}.alpha"}
    n2, _ = lora.create_network_from_weights(1.0, None, None, None, model.unet, weights_sd=no_alpha)
    assert n2.unet_loras[0].scale == 1.0
    zero = {**sd, f"{name}.alpha": torch.tensor(0.0)}
    n3, _ = lora.create_network_from_weights(1.0, None, None, None, model.unet, weights_sd=zero)
    assert n3.unet_loras[0].scale == 1.0 and float(n3.file_state_dict()[f"{name}.alpha"]) == 4.0
    assert f"{name}.alpha is 0" in caplog.text
    # the resume path (load_weights into a created network) reads α = 0 as r with the same warning
    caplog.clear()
    net.load_weights(zero)
    assert net.unet_loras[0].scale == 1.0 and net.unet_loras[0].alpha_value == 4.0
    assert f"{name}.alpha is 0" in caplog.text


@pytest.mark.parametrize("module", [lora, loha, lokr])
def test_merge_weights_to_tensor(model, module) -> None:
    m, net = _leaf_net(model, module)
    sd = net.file_state_dict()
    sub = net.unet_loras[1]
    w = sub.org_module.weight.detach().clone()
    keys = set(sd)
    merged = module.merge_weights_to_tensor(w, sub.lora_name, sd, keys, 1.5, "cpu")
    want = w + sub.delta_weight_scaled(sub.total_scale(1.5)).detach().reshape(w.shape)
    assert torch.allclose(merged, want, atol=1e-6, rtol=0)
    assert not any(k.startswith(sub.lora_name + ".") for k in keys) and len(keys) == len(sd) - len(
        sub.file_tensors()
    )
    other = lora if module is not lora else loha
    assert other.merge_weights_to_tensor(w, sub.lora_name, sd, set(sd), 1.0, "cpu") is w
    assert module.merge_weights_to_tensor(w, "lora_unet_absent", sd, set(sd), 1.0, "cpu") is w


def test_backup_pre_calculation_restore(model) -> None:
    m = model.clone()
    inputs = unet_inputs()
    base = run_unet(m.unet, inputs)
    net = lokr.create_network(0.8, 4, 2, None, None, m.unet, factor="4")
    net.apply_to(None, m.unet)
    randomize(net)
    want = run_unet(m.unet, inputs)
    net.backup_weights()
    net.pre_calculation()
    got = run_unet(m.unet, inputs)
    assert float((got - want).norm() / want.norm()) <= 1e-5
    assert not any(s.enabled for s in net.all_loras)
    net.restore_weights()
    assert torch.equal(run_unet(m.unet, inputs), want)
    net.remove_from()
    assert torch.equal(run_unet(m.unet, inputs), base)


def test_diffusers_named_keys_are_renamed(model) -> None:
    m, net = _leaf_net(model, loha)
    sd = net.file_state_dict()
    sgm = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    diffusers = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    renamed = {k.replace(sgm + ".", diffusers + "."): v for k, v in sd.items()}
    assert any(k.startswith(diffusers + ".") for k in renamed)
    net2, out_sd = loha.create_network_from_weights(1.0, None, None, None, model.unet, weights_sd=renamed)
    assert set(out_sd) == set(sd)
    assert sgm in {s.lora_name for s in net2.unet_loras}
    net2.load_weights(out_sd)


def test_sshs_hashes_follow_the_definition(tmp_path, model) -> None:
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import load_file, save

    net, path = _saved(tmp_path, model)
    net.save_weights(str(path), None, {"ss_network_dim": "4", "other": "x"})
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    data = save(load_file(str(path)), {"ss_network_dim": "4"})  # only ss_* keys take part
    n = int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + n :]).hexdigest()
    assert meta["sshs_legacy_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert meta["other"] == "x" and meta["ss_network_dim"] == "4"


def test_merge_into_fp8_weight(model) -> None:
    m, net = _leaf_net(model, lokr, factor="4")
    sd = net.file_state_dict()
    sub = net.unet_loras[0]
    w8 = sub.org_module.weight.detach().to(torch.float8_e4m3fn)
    merged = lokr.merge_weights_to_tensor(w8, sub.lora_name, sd, set(sd), 1.0, "cpu")
    want = (w8.float() + sub.delta_weight_scaled(sub.total_scale(1.0)).detach().reshape(w8.shape)).to(
        torch.float8_e4m3fn
    )
    assert merged.dtype == torch.float8_e4m3fn and torch.equal(merged.float(), want.float())
