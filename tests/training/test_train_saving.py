"""Saving helpers: sd-scripts file/state names, atomic writes, hashes, ModelSpec and ss_* metadata."""

from __future__ import annotations

import argparse
import hashlib

import pytest

from library.training import saving
from library.training.args import add_training_arguments


def test_sd_scripts_names():
    assert saving.model_file_name("my", "safetensors") == "my.safetensors"
    assert saving.model_file_name(None, "safetensors") == "last.safetensors"
    assert saving.model_file_name("my", "safetensors", epoch=3) == "my-000003.safetensors"
    assert saving.model_file_name(None, "pt", epoch=3) == "epoch-000003.pt"
    assert saving.model_file_name("my", "safetensors", step=40) == "my-step00000040.safetensors"
    assert saving.model_file_name(None, "safetensors", step=40) == "at-step00000040.safetensors"
    assert saving.state_dir_name("my", epoch=2) == "my-000002-state"
    assert saving.state_dir_name("my", step=5) == "my-step00000005-state"
    assert saving.state_dir_name("my") == "my-state"


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "net.safetensors"
    target.write_bytes(b"old")

    def bad_writer(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        saving.atomic_write(target, bad_writer)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["net.safetensors"]  # no temp file left behind
    saving.atomic_write(target, lambda tmp: open(tmp, "wb").write(b"new"))
    assert target.read_bytes() == b"new"


def test_output_dir_not_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="--output_dir .*not writable"):
        saving.check_output_dir_writable(blocker / "out")


def test_hashes(tmp_path):
    data = bytes(range(256)) * (0x120000 // 256)
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    assert saving.legacy_model_hash(path) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert saving.full_model_hash(path) == hashlib.sha256(data).hexdigest()


def _args(**kw):
    parser = argparse.ArgumentParser()
    add_training_arguments(parser)
    args = parser.parse_args(
        ["--pretrained_model_name_or_path", "stabilityai/sdxl", "--network_module", "networks.loha"]
    )
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_modelspec_keys():
    spec = saving.build_modelspec(
        _args(output_name="my", resolution="832,1216"), "stable-diffusion-xl-v1-base", 1.7e9
    )
    assert spec["modelspec.sai_model_spec"] == "1.0.1"
    assert spec["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert spec["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert spec["modelspec.title"] == "my" and spec["modelspec.resolution"] == "832x1216"
    assert spec["modelspec.prediction_type"] == "epsilon" and "modelspec.timestep_range" not in spec
    spec = saving.build_modelspec(_args(v_parameterization=True, min_timestep=100), "x", 1.7e9)
    assert spec["modelspec.title"] == "LoRA@1700000000" and spec["modelspec.resolution"] == "1024x1024"
    assert spec["modelspec.prediction_type"] == "v" and spec["modelspec.timestep_range"] == "100,1000"


def test_training_metadata_strings_and_no_metadata():
    kw = dict(session_id=1, training_started_at=2.0, base_model_version="sdxl_base_v1-0", optimizer_desc="o",
              num_train_images=10, num_reg_images=0, num_batches_per_epoch=5, num_epochs=2,
              network_args={"conv_dim": "4", "dropout": None}, dataset_metadata={"ss_tag_frequency": "{}"})  # fmt: skip
    md = saving.training_metadata(_args(network_dim=8), **kw)
    assert all(isinstance(v, str) for v in md.values())
    assert md["ss_network_module"] == "networks.loha" and md["ss_network_dim"] == "8"
    assert md["ss_network_alpha"] == "1" and md["ss_v2"] == "False"
    assert md["ss_base_model_version"] == "sdxl_base_v1-0" and md["ss_learning_rate"] == "2e-06"
    assert md["ss_network_args"] == '{"conv_dim": "4", "dropout": null}'
    assert md["ss_sd_model_name"] == "stabilityai/sdxl" and md["ss_tag_frequency"] == "{}"
    final = saving.finalize_metadata(md, {"modelspec.title": "t"}, steps=7, epoch=2, no_metadata=False)
    assert final["ss_steps"] == "7" and final["ss_epoch"] == "2" and final["modelspec.title"] == "t"
    small = saving.training_metadata(_args(no_metadata=True), **kw)
    assert set(small) == {"ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim",
                          "ss_network_alpha", "ss_network_args"}  # fmt: skip


def test_atomic_write_gives_default_permissions(tmp_path) -> None:
    """Temp files start 0600; the renamed result must have the permissions a plain open() gives."""
    import os
    import stat

    from library.io.atomic_io import atomic_write

    mask = os.umask(0o022)
    try:
        target = atomic_write(tmp_path / "x.bin", lambda tmp: open(tmp, "wb").write(b"1"))
    finally:
        os.umask(mask)
    import library.io.atomic_io as aio

    assert stat.S_IMODE(target.stat().st_mode) == aio._FILE_MODE
    assert aio._FILE_MODE & 0o044  # readable by group/others under the usual umask
