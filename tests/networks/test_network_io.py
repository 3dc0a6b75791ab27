"""Contract details of spec networks.md §1.5/§1.7/§4.2 not covered elsewhere: a non-safetensors save is
a `torch.save` of the same dict (loadable with weights_only), a second `apply_to` is an error, and
`merge_to` warns about unused keys and refuses a mis-shaped tensor naming its key."""

from __future__ import annotations

import logging

import pytest
import torch

from networks import lokr
from tests.helpers.sdxl_network import build_tiny_sdxl, randomize


@pytest.fixture(scope="module")
def model():
    return build_tiny_sdxl()


def _net(model):
    m = model.clone()
    net = lokr.create_network(1.0, 4, 2, None, None, m.unet, factor=4)
    randomize(net)
    return m, net


def test_pt_save_is_torch_save_of_the_same_dict(tmp_path, model) -> None:
    m, net = _net(model)
    path = tmp_path / "net.pt"
    net.save_weights(str(path), torch.float16, {"ss_network_module": "networks.lokr"})
    sd = torch.load(str(path), weights_only=True)
    want = net.file_state_dict(torch.float16)
    assert set(sd) == set(want)
    assert all(torch.equal(sd[k], want[k]) and sd[k].dtype == want[k].dtype for k in want)
    alphas = [v for k, v in sd.items() if k.endswith(".alpha")]
    assert alphas and all(a.dtype == torch.float32 and a.dim() == 0 for a in alphas)
    assert any(v.dtype == torch.float16 for v in sd.values())
    n2, _ = lokr.create_network_from_weights(1.0, str(path), None, None, m.unet)
    assert {x.lora_name for x in n2.all_loras} == {x.lora_name for x in net.all_loras}
    assert [p.name for p in tmp_path.iterdir()] == ["net.pt"]  # the atomic write leaves no temp file


def test_second_apply_is_an_error(model) -> None:
    m, net = _net(model)
    net.apply_to(None, m.unet)
    with pytest.raises(RuntimeError, match="already applied"):
        net.apply_to(None, m.unet)
    net.remove_from()


def test_merge_to_warns_on_unused_keys_and_names_a_bad_shape(model, caplog) -> None:
    m, net = _net(model)
    sd = net.file_state_dict()
    base = {n: p.detach().clone() for n, p in m.unet.named_parameters()}
    extra = {**sd, "lora_unet_not_a_layer.alpha": torch.tensor(1.0)}
    n2, _ = lokr.create_network_from_weights(1.0, None, None, None, m.unet, weights_sd=dict(sd))
    with caplog.at_level(logging.WARNING):
        n2.merge_to(None, m.unet, extra)
    assert "lora_unet_not_a_layer.alpha" in caplog.text and "not merged" in caplog.text
    assert any(not torch.equal(p, base[n]) for n, p in m.unet.named_parameters())  # merged the rest
    name = net.unet_loras[0].lora_name
    bad = dict(sd)
    key = next(k for k in bad if k.startswith(name + ".lokr_w2"))
    bad[key] = torch.zeros(3, 3)
    n3, _ = lokr.create_network_from_weights(1.0, None, None, None, model.clone().unet, weights_sd=dict(sd))
    with pytest.raises(ValueError, match=f"{key}: shape \\(3, 3\\)"):
        n3.merge_to(None, None, bad)
