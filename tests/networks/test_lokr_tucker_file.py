"""LoKr Tucker conv modules are saved with a full 4-D `lokr_w2` (ComfyUI cannot apply a `lokr_t2` conv core):
the same ΔW (exact in fp64), `keep_tucker_file` keeps the factors, and the saved file loads back both into a
network built from it and into a Tucker network (--network_weights), where the full W2 is re-factored exactly."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors import safe_open
from torch import nn

from networks import lokr
from networks.functional import lokr_delta_weight
from networks.modules.lokr import LoKrModule, plan_lokr, tucker_factors
from networks.network_args import NetworkArgs
from tests.helpers.sdxl_network import build_tiny_sdxl, randomize, run_unet, unet_inputs

ARGS = {"conv_dim": 2, "conv_alpha": 3, "use_tucker": True, "factor": 4}


@pytest.fixture(scope="module")
def model():
    return build_tiny_sdxl()


def _tucker_module(decompose_both: bool) -> LoKrModule:
    leaf = nn.Conv2d(48, 64, 3, padding=1, bias=False).double()
    layout = plan_lokr(64, 48, (3, 3), 2, 8, decompose_both=decompose_both, use_tucker=True)
    assert layout.w2_mode == "tucker" and (layout.w1_rank is not None) == decompose_both
    m = LoKrModule("lora_unet_x", leaf, 1.0, layout, 3.0).double()
    randomize(m, seed=7, std=0.3)
    return m


def _file_delta(tensors: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """ΔW as a loader computes it from the file: s = α/rank(W1) with a factored W1, 1 with both full."""
    t = {k: v.double() for k, v in tensors.items()}
    scale = float(t["alpha"]) / t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else 1.0
    keys = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    return lokr_delta_weight(*(t.get(k) for k in keys), scale, shape)


@pytest.mark.parametrize("decompose_both", [False, True])
def test_full_w2_file_has_the_same_delta_fp64(decompose_both) -> None:
    m = _tucker_module(decompose_both)
    want = m.delta_weight(1.0).detach()
    sd = m.file_tensors()
    assert "lokr_t2" not in sd and "lokr_w2_a" not in sd and sd["lokr_w2"].shape == (8, 8, 3, 3)
    assert sd["lokr_w2"].is_contiguous() and sd["lokr_w2"].dtype == torch.float64
    got = _file_delta(sd, m.layer_shape)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-13
    # loaded back by our loader (a module built from the file's shapes): the same ΔW
    leaf = nn.Conv2d(48, 64, 3, padding=1, bias=False).double()
    m2 = LoKrModule.from_tensors("lora_unet_x", leaf, sd, 1.0, NetworkArgs(algo="lokr")).double()
    m2.load_file_tensors(sd)
    assert m2.lokr_layout.w2_mode == "full"
    assert float((m2.delta_weight(1.0).detach() - want).abs().max() / want.abs().max()) < 1e-13
    # loaded into a Tucker module (resume from a file): re-factored, ΔW kept, own α kept
    m3 = _tucker_module(decompose_both)
    m3.load_file_tensors(sd)
    assert m3.alpha_value == 3.0 and m3.lokr_layout.w2_mode == "tucker"
    assert float((m3.delta_weight(1.0).detach() - want).abs().max() / want.abs().max()) < 1e-12


def test_keep_tucker_file_keeps_the_factors() -> None:
    m = _tucker_module(False)
    m.keep_tucker_file = True
    sd = m.file_tensors()
    assert {"lokr_t2", "lokr_w2_a", "lokr_w2_b"} <= set(sd) and "lokr_w2" not in sd
    assert float(sd["alpha"]) == 3.0


def test_tucker_factors_rebuild_a_low_mode_rank_w2_and_pad_small_modes() -> None:
    g = torch.Generator().manual_seed(0)
    core, a, b = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((3, 3, 3, 3), (3, 2), (3, 10)))
    w2 = torch.einsum("ikxy,iq,kj->qjxy", core, a, b)  # output mode rank 2 < r = 3
    w2_a, w2_b, t2 = tucker_factors(w2, 3)
    assert w2_a.shape == (3, 2) and w2_b.shape == (3, 10) and t2.shape == (3, 3, 3, 3)
    assert torch.equal(w2_a[2], torch.zeros(2))  # the mode has rank 2: its third row is padding
    rebuilt = torch.einsum("ikxy,iq,kj->qjxy", t2, w2_a, w2_b)
    assert float((rebuilt - w2).norm() / w2.norm()) < 1e-14


def test_network_save_log_and_both_reload_paths(tmp_path, model, caplog) -> None:
    inputs = unet_inputs()
    m = model.clone()
    with caplog.at_level(logging.INFO, logger="networks"):
        net = lokr.create_network(1.0, 4, 2, None, None, m.unet, **ARGS)
    notes = [r.message for r in caplog.records if "keep_tucker_file" in r.message]
    tucker = [s for s in net.unet_loras if s.lokr_layout.w2_mode == "tucker"]
    assert len(notes) == 1 and f"{len(tucker)} Tucker conv modules" in notes[0] and tucker
    net.apply_to(None, m.unet)
    randomize(net)
    want = run_unet(m.unet, inputs)
    path = tmp_path / "t.safetensors"
    net.save_weights(str(path), None, {})
    net.remove_from()
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert not any(k.endswith(".lokr_t2") for k in keys)
    assert all(f"{s.lora_name}.lokr_w2" in keys for s in tucker)

    # gen_img / --dim_from_weights: a network built from the file (full W2 modules)
    m2 = model.clone()
    net2, _ = lokr.create_network_from_weights(1.0, str(path), None, None, m2.unet, for_inference=True)
    net2.apply_to(None, m2.unet)
    net2.load_weights(str(path))
    assert float((run_unet(m2.unet, inputs) - want).norm() / want.norm()) < 1e-6
    net2.remove_from()

    # --network_weights: a Tucker network from the same args loads the file, stays Tucker, saves the same W2
    m3 = model.clone()
    net3 = lokr.create_network(1.0, 4, 2, None, None, m3.unet, **ARGS)
    net3.apply_to(None, m3.unet)
    net3.load_weights(str(path))
    assert all(
        s.lokr_layout.w2_mode == "tucker" and s.alpha_value == 3.0 for s in net3.unet_loras if s.is_kxk
    )
    assert float((run_unet(m3.unet, inputs) - want).norm() / want.norm()) < 1e-6
    again, first = net3.file_state_dict(), net.file_state_dict()
    for s in tucker:
        k = f"{s.lora_name}.lokr_w2"
        assert float((again[k] - first[k]).norm() / first[k].norm()) < 1e-6
    net3.remove_from()


def test_bf16_file_reloads_into_tucker_and_a_foreign_full_w2_is_refused(model) -> None:
    net = lokr.create_network(1.0, 4, 2, None, None, model.clone().unet, **ARGS)
    randomize(net)
    sd = net.file_state_dict(torch.bfloat16)
    net2 = lokr.create_network(1.0, 4, 2, None, None, model.clone().unet, **ARGS)
    net2.load_weights(dict(sd))
    s1 = next(s for s in net.unet_loras if s.lokr_layout.w2_mode == "tucker")
    s2 = next(s for s in net2.unet_loras if s.lora_name == s1.lora_name)
    d1, d2 = s1.delta_weight(1.0).detach(), s2.delta_weight(1.0).detach()
    assert float((d2 - d1).norm() / d1.norm()) < 2**-7  # bf16 rounding of the saved factors
    bad = dict(sd)
    key = f"{s1.lora_name}.lokr_w2"
    bad[key] = torch.randn(bad[key].shape).to(torch.bfloat16)  # full mode rank: not Tucker rank 2
    with pytest.raises(ValueError, match=f"{key}: this full W2 is not of Tucker rank 2"):
        net2.load_weights(bad)
