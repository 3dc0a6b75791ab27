"""`--network_args` parsing (spec networks.md §1.3, §1.4): every key as a string and as a native value,
and one clear error naming the argument for each kind of bad input."""

from __future__ import annotations

import pytest

from networks import loha, lokr, lora
from networks.network_args import NetworkArgError, parse_network_args, parse_regex_pairs
from tests.helpers.sdxl_network import build_tiny_sdxl


@pytest.fixture(scope="module")
def model():
    return build_tiny_sdxl()


STRING_ARGS = {
    "verbose": "False",
    "dropout": "0.1",
    "rank_dropout": "0.2",
    "module_dropout": "0.05",
    "exclude_patterns": "[r'.*attn2.*']",
    "include_patterns": "['.*attn2.to_q']",
    "network_reg_lrs": ".*mlp.*=1e-4,.*attn.*=5e-4",
    "network_reg_dims": ".*ff.net.2=6",
    "conv_dim": "4",
    "conv_alpha": "2",
    "use_tucker": "yes",
    "use_scalar": "0",
    "factor": "4",
    "decompose_both": "on",
    "full_matrix": "off",
    "train_llm_adapter": "false",
    "loraplus_lr_ratio": "4",
    "loraplus_unet_lr_ratio": "8",
    "loraplus_text_encoder_lr_ratio": "2.5",
}
NATIVE_ARGS = {
    "verbose": False,
    "dropout": 0.1,
    "rank_dropout": 0.2,
    "module_dropout": 0.05,
    "exclude_patterns": [r".*attn2.*"],
    "include_patterns": ".*attn2.to_q",
    "network_reg_lrs": {".*mlp.*": 1e-4, ".*attn.*": 5e-4},
    "network_reg_dims": {".*ff.net.2": 6},
    "conv_dim": 4,
    "conv_alpha": 2.0,
    "use_tucker": True,
    "use_scalar": False,
    "factor": 4,
    "decompose_both": True,
    "full_matrix": False,
    "train_llm_adapter": False,
    "loraplus_lr_ratio": 4,
    "loraplus_unet_lr_ratio": 8.0,
    "loraplus_text_encoder_lr_ratio": 2.5,
}


@pytest.mark.parametrize("raw", [STRING_ARGS, NATIVE_ARGS], ids=["str", "native"])
def test_every_key_parses_as_str_and_native(raw) -> None:
    a = parse_network_args("lokr", raw)
    assert (a.verbose, a.dropout, a.rank_dropout, a.module_dropout) == (False, 0.1, 0.2, 0.05)
    assert a.exclude_patterns == [".*attn2.*"] and a.include_patterns == [".*attn2.to_q"]
    assert a.reg_lrs == [(".*mlp.*", 1e-4), (".*attn.*", 5e-4)] and a.reg_dims == [(".*ff.net.2", 6)]
    assert (a.conv_dim, a.conv_alpha, a.use_tucker, a.use_scalar) == (4, 2.0, True, False)
    assert (a.factor, a.decompose_both, a.full_matrix, a.train_llm_adapter) == (4, True, False, False)
    assert (a.loraplus_lr_ratio, a.loraplus_unet_lr_ratio, a.loraplus_text_encoder_lr_ratio) == (
        4.0,
        8.0,
        2.5,
    )


def test_defaults_and_dropout_precedence() -> None:
    a = parse_network_args("loha", {})
    assert (a.dropout, a.conv_dim, a.conv_alpha, a.factor, a.use_tucker, a.exclude_patterns) == (
        None,
        None,
        None,
        -1,
        False,
        [],
    )
    # the explicit neuron_dropout argument wins over the trainer-injected dropout kwarg
    assert parse_network_args("loha", {"dropout": "0.3"}, neuron_dropout=0.1).dropout == 0.1
    assert parse_network_args("loha", {"dropout": None}).dropout is None
    assert parse_network_args("loha", {"conv_dim": "8"}).conv_alpha == 1.0
    assert parse_network_args("loha", {"conv_dim": "16.0"}).conv_dim == 16


@pytest.mark.parametrize("text", ["true", "1", "YES", " on ", "True"])
def test_bool_true_forms(text) -> None:
    assert parse_network_args("loha", {"use_tucker": text}).use_tucker is True


@pytest.mark.parametrize("text", ["false", "0", "No", "OFF"])
def test_bool_false_forms(text) -> None:
    assert parse_network_args("loha", {"use_tucker": text}).use_tucker is False


def test_regex_pairs_keep_commas_and_equals() -> None:
    pairs = parse_regex_pairs("network_reg_lrs", r"a{1,3}=1e-4,(?=x)y.*=2,.*mlp.*=5e-4", as_int=False)
    assert pairs == [("a{1,3}", 1e-4), ("(?=x)y.*", 2.0), (".*mlp.*", 5e-4)]


def test_unparsable_literal_is_one_regex() -> None:
    assert parse_network_args("loha", {"exclude_patterns": ".*mlp.*"}).exclude_patterns == [".*mlp.*"]
    assert parse_network_args("loha", {"exclude_patterns": "['a', 'b.*']"}).exclude_patterns == ["a", "b.*"]


@pytest.mark.parametrize(
    "algo,kwargs,match",
    [
        ("loha", {"bogus": "1"}, r"network_args bogus: unknown option .*known options: .*conv_dim"),
        ("loha", {"algo": "lokr"}, r"network_args algo: a LyCORIS-only option"),
        ("lokr", {"dora_wd": "true"}, r"network_args dora_wd: a LyCORIS-only option"),
        ("loha", {"use_tucker": "maybe"}, r"network_args use_tucker='maybe': expected a boolean"),
        ("loha", {"conv_dim": "abc"}, r"network_args conv_dim='abc': expected an integer"),
        ("loha", {"conv_dim": "3.5"}, r"network_args conv_dim='3.5': expected an integer"),
        ("loha", {"rank_dropout": "1.5"}, r"network_args rank_dropout='1.5': expected a probability"),
        (
            "loha",
            {"exclude_patterns": "['(unclosed']"},
            r"network_args exclude_patterns: regex '\(unclosed' does not compile",
        ),
        (
            "loha",
            {"network_reg_lrs": "a(=1e-4"},
            r"network_args network_reg_lrs: regex 'a\(' does not compile",
        ),
        (
            "loha",
            {"network_reg_lrs": ".*=fast"},
            r"network_args network_reg_lrs: '.\*=fast' is not 'regex=number'",
        ),
        (
            "loha",
            {"network_reg_dims": ".*=2.5"},
            r"network_args network_reg_dims \(.\*\)='2.5': expected an integer",
        ),
        ("loha", {"factor": "4"}, r"network_args factor: only valid for networks.lokr, not networks.loha"),
        (
            "lora",
            {"use_tucker": "true"},
            r"network_args use_tucker: only valid for networks.loha / networks.lokr",
        ),
        ("lokr", {"factor": "0"}, r"network_args factor='0': expected -1"),
        ("loha", {"loraplus_lr_ratio": "x"}, r"network_args loraplus_lr_ratio='x': expected a number"),
    ],
)
def test_bad_args_raise_one_clear_error(algo, kwargs, match) -> None:
    with pytest.raises(NetworkArgError, match=match):
        parse_network_args(algo, kwargs)


def test_selection_errors_name_the_argument(model) -> None:
    with pytest.raises(NetworkArgError, match=r"network_reg_dims: pattern 'nothing\.here' matches no module"):
        loha.create_network(1.0, 4, 1, None, model.tes, model.unet, network_reg_dims="nothing.here=8")
    with pytest.raises(
        NetworkArgError,
        match=r"exclude_patterns / include_patterns / network_reg_dims: the selection matches zero modules",
    ):
        loha.create_network(1.0, 4, 1, None, model.tes, model.unet, exclude_patterns="['.*']")
    with pytest.raises(ValueError, match=r"network_dim=0"):
        loha.create_network(1.0, 0, 1, None, model.tes, model.unet)
    with pytest.raises(ValueError, match=r"network_dim='x'"):
        loha.create_network(1.0, "x", 1, None, model.tes, model.unet)
    with pytest.raises(ValueError, match=r"network_alpha='a'"):
        loha.create_network(1.0, 4, "a", None, model.tes, model.unet)


def test_patterns_and_reg_dims_select_modules(model) -> None:
    net = lokr.create_network(
        1.0,
        4,
        2,
        None,
        model.tes,
        model.unet,
        exclude_patterns="[r'.*attn2.*', r'text_model.*mlp.*']",
        include_patterns="[r'.*attn2\\.to_q']",
        network_reg_dims=r".*ff\.net\.2=6,.*proj_in=0",
    )
    names = {m.lora_name: m for m in net.all_loras}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_q" in names  # include overrides exclude
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k" not in names
    assert not any("mlp" in n for n in names)
    assert not any(n.endswith("proj_in") for n in names)  # dim 0 → skipped
    assert names["lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_2"].rank == 6
    assert names["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"].rank == 4


def test_lora_and_loha_take_the_same_common_args(model) -> None:
    for module in (lora, loha):
        net = module.create_network(
            1.0,
            4,
            2,
            None,
            model.tes,
            model.unet,
            rank_dropout="0.1",
            module_dropout="0.1",
            dropout="0.2",
            conv_dim="2",
        )
        sub = net.unet_loras[0]
        assert (sub.rank_dropout, sub.module_dropout, sub.dropout) == (0.1, 0.1, 0.2)


def test_train_llm_adapter_is_ignored_with_a_warning_on_sdxl(model, caplog) -> None:
    with caplog.at_level("WARNING"):
        net = loha.create_network(1.0, 4, 1, None, model.tes, model.unet, train_llm_adapter="true")
    assert len(net.unet_loras) == 192
    assert any("train_llm_adapter is an Anima option" in r.getMessage() for r in caplog.records)


def test_alpha_zero_means_each_modules_rank(model) -> None:
    net = loha.create_network(
        1.0, 4, 0, None, None, model.unet, network_reg_dims=r".*ff\.net\.2=6", conv_dim=2, conv_alpha=0
    )
    for m in net.unet_loras:
        assert m.alpha_value == m.rank and m.scale == 1.0
    assert {m.rank for m in net.unet_loras} == {2, 4, 6}
