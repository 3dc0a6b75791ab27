"""Resume with network dropout, the pickle-free state load, the dropout seed, ss_total_batch_size and the
lr/ log names (tiny SDXL)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import sdxl_train_network
from library.training.utils import lr_log_names
from networks.network_base import AdapterNetwork
from tests.helpers.train_sdxl import N_IMAGES, _argv, _tb_scalars

DROPOUT = ["--network_args", "rank_dropout=0.5", "module_dropout=0.3", "--network_dropout", "0.3"]


def test_resume_with_dropout_is_bit_identical_and_pickle_free(tiny, tmp_path, monkeypatch):  # noqa: F811
    toml_path = tmp_path / "bs2.toml"
    toml_path.write_text(tiny["toml"].read_text().replace(f"batch_size = {N_IMAGES}", "batch_size = 2"))
    common = ["--dataset_config", str(toml_path), "--network_module", "networks.lora", "--network_dim", "4",
              "--learning_rate", "1e-2", "--max_train_steps", "6", "--cache_latents", *DROPOUT]  # fmt: skip
    full = sdxl_train_network.main(
        _argv(tiny, tmp_path / "full", *common, "--save_every_n_steps", "3", "--save_state")
    )
    state = tmp_path / "full" / "net-step00000003-state"
    assert (state / "network_step_starts.txt").read_text() == "3"  # one micro-step per update

    calls: list[dict] = []
    real_load = torch.load

    def spy_load(*a, **k):
        calls.append(k)
        return real_load(*a, **k)

    monkeypatch.setattr(torch, "load", spy_load)
    resumed = sdxl_train_network.main(_argv(tiny, tmp_path / "resumed", *common, "--resume", str(state)))
    # optimizer, scheduler and RNG files: every one read with weights_only=True
    assert len(calls) >= 3 and all(k.get("weights_only") is True for k in calls), calls
    monkeypatch.setattr(torch, "load", real_load)
    wa, wb = load_file(str(full.final_path)), load_file(str(resumed.final_path))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    # the dropout clock matters: without it the resumed run draws other masks and ends elsewhere
    clockless = tmp_path / "clockless-state"
    shutil.copytree(state, clockless)
    (clockless / "network_step_starts.txt").unlink()
    other = sdxl_train_network.main(_argv(tiny, tmp_path / "other", *common, "--resume", str(clockless)))
    wc = load_file(str(other.final_path))
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_dropout_seed_total_batch_size_and_lr_names(tiny, tmp_path, monkeypatch):  # noqa: F811
    # the flat (no TOML) dataset form writes ss_total_batch_size
    train_dir = tmp_path / "train"
    shutil.copytree(tiny["img_dir"], train_dir / "1_sks")
    seeds: list[int] = []
    real = AdapterNetwork.set_dropout_seed

    def spy(self, seed):
        seeds.append(seed)
        return real(self, seed)

    monkeypatch.setattr(AdapterNetwork, "set_dropout_seed", spy)
    argv = _argv(tiny, tmp_path / "out", "--network_module", "networks.lora", "--network_dim", "4",
                 "--max_train_steps", "1", "--cache_latents", "--train_data_dir", str(train_dir),
                 "--resolution", "64", "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
                 "--text_encoder_lr", "1e-4", "--learning_rate", "1e-3", "--logging_dir", str(tmp_path / "logs"), *DROPOUT)  # fmt: skip
    i = argv.index("--dataset_config")
    del argv[i : i + 2]
    result = sdxl_train_network.main(argv)
    assert seeds == [42]  # the network's dropout draws follow --seed
    with safe_open(str(result.final_path), "pt") as f:
        md = f.metadata()
    # batch 2 x 1 process x accumulation 2
    assert md["ss_batch_size_per_device"] == "2" and md["ss_total_batch_size"] == "4"
    # both text encoders keep their own key (sd-scripts logs one lr/textencoder)
    logs = tmp_path / "logs"
    lrs = {tag: _tb_scalars(logs, tag).get(1) for tag in ("lr/textencoder 1", "lr/textencoder 2", "lr/unet")}
    assert lrs == {"lr/textencoder 1": pytest.approx(1e-4), "lr/textencoder 2": pytest.approx(1e-4),
                   "lr/unet": pytest.approx(1e-3)}  # fmt: skip

    # without --seed the trainer draws one and the network gets that same seed
    seeds.clear()
    argv[argv.index("--seed") : argv.index("--seed") + 2] = []
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "out2")
    result = sdxl_train_network.main(argv)
    with safe_open(str(result.final_path), "pt") as f:
        drawn = f.metadata()["ss_seed"]
    assert seeds == [int(drawn)]


def test_lr_log_names_unique():
    assert lr_log_names(["textencoder 1", "textencoder 2", "unet"], 3, True, True) == [
        "textencoder 1",
        "textencoder 2",
        "unet",
    ]
    # a module that repeats a description: every key stays unique
    assert lr_log_names(["textencoder", "textencoder", "unet"], 3, True, True) == [
        "textencoder group0",
        "textencoder group1",
        "unet",
    ]
    assert lr_log_names(None, 2, True, True) == ["textencoder", "unet"]
    assert lr_log_names(None, 1, True, False) == ["unet"]
    assert lr_log_names(None, 1, False, True) == ["textencoder"]
    assert lr_log_names(None, 3, True, True) == ["group0", "group1", "group2"]
