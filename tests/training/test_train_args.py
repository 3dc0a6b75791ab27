"""Trainer flags: sd-scripts defaults, --config_file precedence, unknown/unsupported flags."""

from __future__ import annotations

import logging

import pytest

from library.training.args import parse_args, parse_warmup_steps, write_config_file
from sdxl_train_network import setup_parser


def _base(tmp_path):
    return ["--pretrained_model_name_or_path", "m.safetensors", "--network_module", "networks.lora",
            "--output_dir", str(tmp_path / "out")]  # fmt: skip


def test_sd_scripts_defaults(tmp_path):
    args = parse_args(setup_parser(), _base(tmp_path))
    assert args.learning_rate == 2e-6
    assert args.max_train_steps == 1600
    assert args.network_alpha == 1 and args.network_dim is None
    assert args.optimizer_type == "" and args.lr_scheduler == "constant" and args.lr_warmup_steps == "0"
    assert args.max_grad_norm == 1.0 and args.gradient_accumulation_steps == 1
    assert args.mixed_precision == "no" and args.save_precision is None
    assert args.save_model_as == "safetensors" and args.sample_sampler == "ddim"
    assert args.min_bucket_reso == 256 and args.max_bucket_reso == 1024 and args.bucket_reso_steps == 64
    assert args.train_batch_size == 1 and args.caption_extension == ".caption"
    assert args.multires_noise_discount == 0.3 and args.loss_type == "l2" and args.huber_c == 0.1


def test_prefix_abbreviation_and_implications(tmp_path):
    args = parse_args(setup_parser(), _base(tmp_path) + ["--learning_r", "1e-4", "--cache_latents_to_disk",
                                                           "--logging_dir", str(tmp_path / "logs")])  # fmt: skip
    assert args.learning_rate == 1e-4
    assert args.cache_latents is True
    assert args.log_with == "tensorboard"


def test_config_file_precedence(tmp_path):
    cfg = tmp_path / "flags.toml"
    cfg.write_text("learning_rate = 0.001\n[training]\nmax_train_steps = 7\nnetwork_dim = 8\n")
    args = parse_args(setup_parser(), _base(tmp_path) + ["--config_file", str(cfg), "--network_dim", "16"])
    assert args.learning_rate == 0.001  # file beats default
    assert args.max_train_steps == 7  # one table deep is read
    assert args.network_dim == 16  # CLI beats file
    # the .toml suffix may be omitted, as in sd-scripts
    args = parse_args(setup_parser(), _base(tmp_path) + ["--config_file", str(tmp_path / "flags")])
    assert args.network_dim == 8


def test_config_file_unknown_key(tmp_path):
    cfg = tmp_path / "flags.toml"
    cfg.write_text("learning_rate = 0.001\nlearnig_rate = 0.1\n")
    with pytest.raises(ValueError, match=r"unknown keys \['learnig_rate'\]"):
        parse_args(setup_parser(), _base(tmp_path) + ["--config_file", str(cfg)])


def test_output_config_roundtrip(tmp_path):
    cfg = tmp_path / "dump.toml"
    parser = setup_parser()
    args = parse_args(
        parser, _base(tmp_path) + ["--network_dim", "12", "--output_config", "--config_file", str(cfg)]
    )
    write_config_file(parser, args)
    again = parse_args(setup_parser(), ["--config_file", str(cfg)])
    assert again.network_dim == 12 and again.network_module == "networks.lora"


def test_unknown_flag_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(setup_parser(), _base(tmp_path) + ["--no_such_flag", "1"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --no_such_flag" in capsys.readouterr().err


def test_unsupported_flags_refused_or_warned(tmp_path, caplog):
    with pytest.raises(ValueError, match="--deepspeed"):
        parse_args(setup_parser(), _base(tmp_path) + ["--deepspeed"])
    with pytest.raises(ValueError, match="--v2"):
        parse_args(setup_parser(), _base(tmp_path) + ["--v2"])
    with caplog.at_level(logging.WARNING):
        parse_args(setup_parser(), _base(tmp_path) + ["--xformers"])
    assert "--xformers is ignored" in caplog.text


def test_bad_combinations(tmp_path):
    with pytest.raises(ValueError, match="--network_args: 'conv_dim' is not key=value"):
        parse_args(setup_parser(), _base(tmp_path) + ["--network_args", "conv_dim"])
    with pytest.raises(ValueError, match="requires --network_train_unet_only"):
        parse_args(setup_parser(), _base(tmp_path) + ["--cache_text_encoder_outputs"])
    with pytest.raises(ValueError, match="--fp8_base needs --mixed_precision"):
        parse_args(setup_parser(), _base(tmp_path) + ["--fp8_base"])
    with pytest.raises(FileNotFoundError, match="--network_weights"):
        parse_args(
            setup_parser(), _base(tmp_path) + ["--network_weights", str(tmp_path / "nope.safetensors")]
        )
    with pytest.raises(ValueError, match="--pretrained_model_name_or_path is required"):
        parse_args(setup_parser(), ["--network_module", "networks.lora", "--output_dir", "x"])


def test_warmup_steps_forms():
    assert parse_warmup_steps("10", 100) == 10
    assert parse_warmup_steps("0.1", 200) == 20
    assert parse_warmup_steps("5%", 300) == 15
    assert parse_warmup_steps("0", 300) == 0
    with pytest.raises(ValueError, match="lr_warmup_steps"):
        parse_warmup_steps("ten", 100)
