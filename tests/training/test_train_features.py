"""Trainer features on the tiny SDXL: epochs/accumulation/save rotation, TensorBoard scalars, NaN stop,
--fp8_base, sample PNGs, and the demo (the README's main job)."""

from __future__ import annotations

import re

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import sdxl_train_network
from networks.fp8 import FP8_DTYPE, apply_fp8_base
from tests.helpers.train_sdxl import (
    N_IMAGES,
    _argv,
    _tb_scalars,
)


@pytest.fixture(scope="module")
def bs2_toml(tiny, tmp_path_factory):  # noqa: F811 - pytest fixture argument
    path = tmp_path_factory.mktemp("bs2") / "bs2.toml"
    path.write_text(tiny["toml"].read_text().replace(f"batch_size = {N_IMAGES}", "batch_size = 2"))
    return path


def _with_toml(argv, toml_path):
    argv[argv.index("--dataset_config") + 1] = str(toml_path)
    return argv


def test_epochs_accumulation_rotation_and_tensorboard(tiny, bs2_toml, tmp_path):  # noqa: F811
    out, logs = tmp_path / "out", tmp_path / "logs"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# skipped\na photo of sks thing0 --w 64 --h 64 --s 2 --d 5\n")
    # 2 batches per epoch, accumulation 2 -> one optimizer step per epoch; 3 epochs -> 3 steps
    result = sdxl_train_network.main(
        _with_toml(
            _argv(
                tiny,
                out,
                "--network_module",
                "networks.lora",
                "--learning_rate",
                "1e-3",
                "--max_train_epochs",
                "3",
                "--gradient_accumulation_steps",
                "2",
                "--save_every_n_epochs",
                "1",
                "--save_last_n_epochs",
                "1",
                "--logging_dir",
                str(logs),
                "--text_encoder_lr",
                "5e-4",
                "--cache_latents",
                "--sample_prompts",
                str(prompts),
                "--sample_every_n_epochs",
                "2",
                "--sample_every_n_steps",
                "1",
            ),
            bs2_toml,
        )  # fmt: skip
    )
    assert result.global_step == 3
    names = sorted(p.name for p in out.iterdir())
    # epoch 1 was rotated out by --save_last_n_epochs 1; epoch 3 is the final file
    assert names == ["net-000002.safetensors", "net.safetensors", "sample"]
    # --sample_every_n_epochs wins over --sample_every_n_steps: one sample, after epoch 2
    samples = [p.name for p in (out / "sample").iterdir()]
    assert len(samples) == 1 and re.fullmatch(r"net_e000002_00_\d{14}_5\.png", samples[0])
    with safe_open(str(out / "net-000002.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["ss_epoch"] == "2" and md["ss_steps"] == "2" and md["ss_num_epochs"] == "3"
    assert md["ss_gradient_accumulation_steps"] == "2" and md["ss_text_encoder_lr"] == "[0.0005]"
    assert sorted(_tb_scalars(logs, "loss/current")) == [1, 2, 3]
    assert sorted(_tb_scalars(logs, "loss/epoch_average")) == [1, 2, 3]
    assert len(_tb_scalars(logs, "loss/average")) == 3
    lr_te = _tb_scalars(logs, "lr/textencoder 1")  # descriptions come from the network module
    lr_unet = _tb_scalars(logs, "lr/unet")
    assert lr_te[1] == pytest.approx(5e-4) and lr_unet[1] == pytest.approx(1e-3)


def test_nan_loss_stops_with_step_and_keeps_last_good_save(tiny, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    # an absurd learning rate turns the weights to inf after the first update: the next loss is NaN
    with pytest.raises(
        FloatingPointError, match=r"loss is NaN/Inf at step 2 .*net-step00000001\.safetensors"
    ):
        sdxl_train_network.main(
            _argv(
                tiny,
                out,
                "--network_module",
                "networks.lora",
                "--learning_rate",
                "1e30",
                "--optimizer_type",
                "SGDNesterov",
                "--max_grad_norm",
                "0",
                "--max_train_steps",
                "4",
                "--save_every_n_steps",
                "1",
                "--cache_latents",
            )  # fmt: skip
        )
    assert sorted(p.name for p in out.iterdir()) == ["net-step00000001.safetensors"]


@pytest.mark.parametrize("flag", ["--fp8_base", "--fp8_scaled"])
def test_fp8_base_layers_and_training(tiny, tmp_path, flag):  # noqa: F811
    torch.manual_seed(0)
    lin, conv = torch.nn.Linear(16, 8), torch.nn.Conv2d(4, 6, 3, padding=1)
    x, img = torch.randn(3, 16), torch.randn(1, 4, 8, 8)
    ref_lin, ref_conv = lin(x), conv(img)
    seq = torch.nn.Sequential(lin, conv)
    scaled = flag == "--fp8_scaled"
    assert apply_fp8_base(seq, scaled) == 2
    assert (
        lin.weight.dtype == FP8_DTYPE and conv.weight.dtype == FP8_DTYPE and lin.bias.dtype == torch.float32
    )
    if scaled:  # one float32 scale per output channel
        assert lin.scale_weight.shape == (8, 1) and conv.scale_weight.shape == (6, 1, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_lin, got_conv = lin(x), conv(img)
    assert got_lin.dtype == torch.bfloat16
    # e4m3 keeps ~3 mantissa bits: a few percent of error, far from garbage
    assert (got_lin.float() - ref_lin).abs().max() < 0.1 * ref_lin.abs().max()
    assert (got_conv.float() - ref_conv).abs().max() < 0.1 * ref_conv.abs().max()
    result = sdxl_train_network.main(
        _argv(
            tiny,
            tmp_path / "out",
            "--network_module",
            "networks.loha",
            "--mixed_precision",
            "bf16",
            flag,
            "--gradient_checkpointing",
            "--learning_rate",
            "1e-3",
            "--max_train_steps",
            "2",
            "--save_precision",
            "bf16",
        )  # fmt: skip
    )
    with safe_open(str(result.final_path), "pt") as f:
        w = f.get_tensor(next(k for k in f.keys() if k.endswith("hada_w1_a")))
        alpha = f.get_tensor(next(k for k in f.keys() if k.endswith(".alpha")))
        assert f.metadata()["ss_fp8_base"] == "True"
    assert w.dtype == torch.bfloat16 and torch.isfinite(w.float()).all()
    assert alpha.dtype == torch.float32


def test_demo_writes_network_and_sample_png(tmp_path):
    import demo_tiny_loha

    out = tmp_path / "demo"
    threads = torch.get_num_threads()
    try:
        assert demo_tiny_loha.main(["--output_dir", str(out), "--max_train_steps", "4"]) == 0
    finally:
        torch.set_num_threads(threads)  # the demo pins one thread; do not leak that into other tests
    weights = out / "tiny-loha.safetensors"
    with safe_open(str(weights), "pt") as f:
        assert any(k.endswith("hada_w2_b") for k in f.keys())
        assert f.metadata()["ss_network_module"] == "networks.loha"
    samples = sorted((out / "sample").glob("tiny-loha_000004_00_*_1234.png"))
    assert len(samples) == 1
    img = Image.open(samples[0])
    assert img.size == (64, 64) and img.text["seed"] == "1234"


def test_full_bf16_8bit_adam_text_encoder_only(tiny, tmp_path):  # noqa: F811
    result = sdxl_train_network.main(
        _argv(
            tiny,
            tmp_path / "out",
            "--network_module",
            "networks.lora",
            "--mixed_precision",
            "bf16",
            "--full_bf16",
            "--optimizer_type",
            "AdamW8bit",
            "--network_train_text_encoder_only",
            "--learning_rate",
            "1e-3",
            "--max_train_steps",
            "2",
            "--cache_latents",
        )  # fmt: skip
    )
    with safe_open(str(result.final_path), "pt") as f:
        keys = list(f.keys())
        up = f.get_tensor(next(k for k in keys if k.endswith("lora_up.weight")))
        md = f.metadata()
    assert keys and all(k.startswith("lora_te") for k in keys)  # the U-Net half is not trained nor saved
    assert up.dtype == torch.bfloat16 and up.abs().sum() > 0  # --full_bf16 trains (and saves) in bf16
    assert md["ss_optimizer"].startswith("bitsandbytes.optim.adamw.AdamW8bit")
