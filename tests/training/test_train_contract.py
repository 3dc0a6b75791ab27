"""The sd-scripts network-module contract as the trainer drives it (spec sdxl.md §1 call order),
observed through a spy module that wraps networks.lora and records every call."""

from __future__ import annotations

import json
import sys

from safetensors import safe_open

import sdxl_train_network
from tests.helpers.train_sdxl import _argv

SPY = """
import networks.lora as real

CALLS = []


def _wrap(net):
    cls = type(net)

    class Spy(cls):
        pass

    for name in ("set_loraplus_lr_ratio", "apply_to", "load_weights", "prepare_optimizer_params_with_multiple_te_lrs",
                 "prepare_grad_etc", "on_epoch_start", "on_step_start", "apply_max_norm_regularization",
                 "save_weights", "merge_to"):
        if not hasattr(cls, name):
            continue
        def make(n):
            def f(self, *a, **k):
                CALLS.append((n, a, k))
                return getattr(cls, n)(self, *a, **k)
            return f
        setattr(Spy, name, make(name))
    net.__class__ = Spy
    return net


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=None, **kwargs):
    CALLS.append(("create_network", (multiplier, network_dim, network_alpha), dict(kwargs, neuron_dropout=neuron_dropout)))
    return _wrap(real.create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet,
                                     neuron_dropout=neuron_dropout, **kwargs))


def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False, **kw):
    CALLS.append(("create_network_from_weights", (multiplier, file), dict(kw, for_inference=for_inference)))
    net, sd = real.create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd,
                                               for_inference=for_inference, **kw)
    return _wrap(net), sd
"""


def test_call_order_base_weights_dropout_and_max_norm(tiny, tmp_path, monkeypatch):  # noqa: F811
    base = sdxl_train_network.main(
        _argv(
            tiny,
            tmp_path / "base",
            "--network_module",
            "networks.lora",
            "--learning_rate",
            "1e-3",
            "--max_train_steps",
            "1",
            "--network_dim",
            "4",
            "--cache_latents",
        )  # fmt: skip
    ).final_path
    (tmp_path / "spy_net.py").write_text(SPY)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("spy_net", None)
    out = tmp_path / "out"
    sdxl_train_network.main(
        _argv(
            tiny,
            out,
            "--network_module",
            "spy_net",
            "--network_dim",
            "4",
            "--network_alpha",
            "2",
            "--network_args",
            "rank_dropout=0.1",
            "module_dropout=0",
            "--network_dropout",
            "0.05",
            "--base_weights",
            str(base),
            "--base_weights_multiplier",
            "0.5",
            "--scale_weight_norms",
            "1.0",
            "--unet_lr",
            "2e-3",
            "--loraplus_unet_lr_ratio",
            "4",
            "--text_encoder_lr",
            "1e-4",
            "--network_weights",
            str(base),
            "--max_train_steps",
            "2",
            "--cache_latents",
        )  # fmt: skip
    )
    import spy_net

    names = [c[0] for c in spy_net.CALLS]
    # (1) base weights: built for inference with the multiplier, then merged
    assert names[:2] == ["create_network_from_weights", "merge_to"]
    assert spy_net.CALLS[0][1] == (0.5, str(base)) and spy_net.CALLS[0][2]["for_inference"] is True
    # (2) the training network: --network_args stay strings, dropout injected from --network_dropout
    create = spy_net.CALLS[2]
    assert create[0] == "create_network" and create[1] == (1.0, 4, 2.0)
    assert create[2] == {
        "rank_dropout": "0.1",
        "module_dropout": "0",
        "dropout": 0.05,
        "neuron_dropout": 0.05,
    }
    # LoRA+ ratios go to the network before the groups are made
    assert spy_net.CALLS[3][0] == "set_loraplus_lr_ratio" and spy_net.CALLS[3][1] == (None, 4.0, None)
    # (4) attach both halves, (5) start weights, (7) groups with both learning rates
    assert names[4:7] == ["apply_to", "load_weights", "prepare_optimizer_params_with_multiple_te_lrs"]
    assert spy_net.CALLS[4][1][2:] == (True, True)
    assert spy_net.CALLS[6][1] == ([1e-4], 2e-3, 2e-6)
    rest = names[7:]
    assert rest.count("apply_max_norm_regularization") == 2  # after each optimizer step
    assert rest.index("on_epoch_start") < rest.index("apply_max_norm_regularization")
    assert rest[-1] == "save_weights"
    with safe_open(str(out / "net.safetensors"), "pt") as f:
        md = f.metadata()
    # [Q] replicated: the injected dropout appears in ss_network_args
    assert json.loads(md["ss_network_args"]) == {
        "rank_dropout": "0.1",
        "module_dropout": "0",
        "dropout": 0.05,
    }
    assert md["ss_network_dropout"] == "0.05" and md["ss_scale_weight_norms"] == "1.0"
