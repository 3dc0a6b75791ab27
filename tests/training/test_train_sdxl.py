"""End-to-end SDXL network training on a tiny SDXL-architecture checkpoint (CPU).

Proves: LoRA/LoHa/LoKr training lowers a fixed-batch loss and writes SGM-named keys with metadata;
the file restarts training (--network_weights, --dim_from_weights) and loads with
create_network_from_weights; --save_state/--resume continues bit-identically; bad input fails
with one clear error and leaves no output.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import sdxl_train_network
from library.sdxl.loading import load_sdxl_models
from library.sdxl.loss import sdxl_time_ids, sdxl_training_step_loss
from library.sdxl.text import encode_prompts
from tests.helpers.train_sdxl import N_IMAGES, _argv, _tb_scalars


def _expected_names(models) -> set[str]:
    """Golden SGM names from the spec's diffusers→SGM table (written independently of networks/)."""
    names = set()
    for path, mod in models.unet.named_modules():
        if type(mod).__name__ != "Transformer2DModel":
            continue
        m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.attentions\.(\d+)", path)
        if m:
            i, j = int(m[2]), int(m[3])
            sgm = f"input_blocks.{3 * i + j + 1}.1" if m[1] == "down" else f"output_blocks.{3 * i + j}.1"
        else:
            assert path == "mid_block.attentions.0"
            sgm = "middle_block.1"
        for sub, leaf in mod.named_modules():
            if isinstance(leaf, torch.nn.Linear):
                names.add("lora_unet_" + f"{sgm}.{sub}".replace(".", "_"))
    for k, te in ((1, models.text_encoder_1), (2, models.text_encoder_2)):
        for layer in range(te.config.num_hidden_layers):
            for sub in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj",
                        "mlp_fc1", "mlp_fc2"):  # fmt: skip
                names.add(f"lora_te{k}_text_model_encoder_layers_{layer}_{sub}")
    return names


def _fixed_batch_loss(tiny, module: str | None = None, weights: Path | None = None) -> float:
    """Loss of the whole dataset at fixed timesteps/noise, optionally with a trained network applied."""
    models = load_sdxl_models(str(tiny["ckpt"]), tokenizer_dir=str(tiny["tok"]))
    if weights is not None:
        mod = importlib.import_module(module)
        net, sd = mod.create_network_from_weights(
            1.0, str(weights), models.vae, models.text_encoders, models.unet
        )
        net.apply_to(models.text_encoders, models.unet, True, True)
        net.load_state_dict(sd, strict=True)
        net.eval()
    paths = sorted(tiny["img_dir"].glob("*.png"))
    images = torch.stack(
        [torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1).float() / 127.5 - 1 for p in paths]
    )
    captions = [(p.with_suffix(".txt")).read_text() for p in paths]
    torch.manual_seed(0)
    with torch.no_grad():
        latents = models.vae.encode(images).latent_dist.mean * 0.13025
        context, pooled = encode_prompts(models, captions)
        time_ids = sdxl_time_ids([(64, 64)] * len(paths), [(0, 0)] * len(paths), [(64, 64)] * len(paths))
        total = 0.0
        for s, t in enumerate((200, 500, 800)):
            gen = torch.Generator().manual_seed(s)
            ts = torch.full((len(paths),), t)
            total += (
                sdxl_training_step_loss(
                    models.unet, latents, context, pooled, time_ids, None, generator=gen, timesteps=ts
                )
                .mean()
                .item()
            )
    return total / 3


@pytest.mark.parametrize(
    "module, extra",
    [("networks.lora", ["--learning_rate", "1e-2"]),
     # U-Net only with cached TE outputs: faster, and proves the TE half is dropped from the file
     ("networks.loha", ["--learning_rate", "1e-2", "--network_train_unet_only", "--cache_text_encoder_outputs"]),
     ("networks.lokr", ["--learning_rate", "3e-2", "--network_args", "factor=4", "--network_train_unet_only",
                        "--cache_text_encoder_outputs"])],
)  # fmt: skip
def test_training_lowers_loss_and_writes_sgm_keys(tiny, tmp_path, module, extra):
    out = tmp_path / "out"
    result = sdxl_train_network.main(
        _argv(tiny, out, "--network_module", module, "--network_dim", "4", "--network_alpha", "4", *extra,
              "--max_train_steps", "8", "--cache_latents", "--optimizer_type", "AdamW", "--save_every_n_steps", "4")
    )  # fmt: skip
    final = out / "net.safetensors"
    assert result.final_path == final and final.is_file()
    assert (out / "net-step00000004.safetensors").is_file()
    assert result.global_step == 8
    with safe_open(str(final), "pt") as f:
        keys, md = set(f.keys()), f.metadata()
    names = {k.split(".", 1)[0] for k in keys}
    models = load_sdxl_models(str(tiny["ckpt"]), tokenizer_dir=str(tiny["tok"]))
    expected = _expected_names(models)
    if "--network_train_unet_only" in extra:
        expected = {n for n in expected if n.startswith("lora_unet_")}
    else:
        assert "lora_te2_text_model_encoder_layers_2_mlp_fc2" in names
    assert names == expected
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert (
        md["ss_network_module"] == module and md["ss_network_dim"] == "4" and md["ss_network_alpha"] == "4.0"
    )
    assert md["ss_base_model_version"] == "sdxl_base_v1-0" and md["ss_steps"] == "8"
    assert md["ss_num_train_images"] == str(N_IMAGES) and md["ss_sd_model_name"] == "tiny_sdxl.safetensors"
    assert (
        md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora" and md["modelspec.title"] == "net"
    )
    assert "sshs_model_hash" in md
    base = _fixed_batch_loss(tiny)
    trained = _fixed_batch_loss(tiny, module, final)
    assert trained < base * 0.99, (base, trained)  # deterministic eval: a real decrease


def test_network_weights_restart_and_dim_from_weights(tiny, tmp_path):
    first = sdxl_train_network.main(
        _argv(
            tiny,
            tmp_path / "a",
            "--network_module",
            "networks.loha",
            "--network_dim",
            "2",
            "--learning_rate",
            "3e-3",
            "--max_train_steps",
            "2",
        )  # fmt: skip
    ).final_path
    start = load_file(str(first))
    # a near-zero learning rate: the restarted network must start exactly from the file
    again = sdxl_train_network.main(
        _argv(
            tiny,
            tmp_path / "b",
            "--network_module",
            "networks.loha",
            "--network_weights",
            str(first),
            "--dim_from_weights",
            "--learning_rate",
            "1e-12",
            "--max_train_steps",
            "1",
        )  # fmt: skip
    ).final_path
    end = load_file(str(again))
    assert set(end) == set(start)
    for k in start:
        torch.testing.assert_close(end[k], start[k], rtol=0, atol=1e-9)


def test_resume_from_save_state_is_bit_identical(tiny, tmp_path):
    # batch size 2: two batches per epoch, so the step-3 state sits in the middle of epoch 2
    toml_path = tmp_path / "bs2.toml"
    toml_path.write_text(tiny["toml"].read_text().replace(f"batch_size = {N_IMAGES}", "batch_size = 2"))
    common = ["--dataset_config", str(toml_path), "--network_module", "networks.lora", "--network_dim", "4", "--learning_rate", "1e-3",
              "--max_train_steps", "6", "--lr_scheduler", "cosine", "--lr_warmup_steps", "2"]  # fmt: skip
    full = sdxl_train_network.main(
        _argv(
            tiny,
            tmp_path / "full",
            *common,
            "--save_every_n_steps",
            "3",
            "--save_state",
            "--logging_dir",
            str(tmp_path / "log_full"),
        )  # fmt: skip
    )
    state = tmp_path / "full" / "net-step00000003-state"
    assert json.loads((state / "train_state.json").read_text()) == {"current_epoch": 1, "current_step": 3}
    assert (state / "loop_position.txt").read_text() == "1"  # one batch of epoch 2 was done
    resumed = sdxl_train_network.main(
        _argv(
            tiny,
            tmp_path / "resumed",
            *common,
            "--resume",
            str(state),
            "--logging_dir",
            str(tmp_path / "log_res"),
        )
    )
    assert resumed.global_step == 6
    a = _tb_scalars(tmp_path / "log_full", "loss/current")
    b = _tb_scalars(tmp_path / "log_res", "loss/current")
    assert sorted(a) == [1, 2, 3, 4, 5, 6] and sorted(b) == [4, 5, 6]
    assert [a[s] for s in (4, 5, 6)] == [b[s] for s in (4, 5, 6)]
    assert set(_tb_scalars(tmp_path / "log_full", "lr/unet")) or set(
        _tb_scalars(tmp_path / "log_full", "lr/group0")
    )
    wa, wb = load_file(str(full.final_path)), load_file(str(resumed.final_path))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _no_output(out: Path) -> bool:
    return not out.exists() or not any(out.iterdir())


def test_bad_inputs_fail_clearly_without_output(tiny, tmp_path):
    out = tmp_path / "out"
    lora = ["--network_module", "networks.lora", "--max_train_steps", "1"]
    # a missing image folder
    bad_toml = tmp_path / "missing.toml"
    bad_toml.write_text(f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'nope'}'\n")
    argv = _argv(tiny, out, *lora)
    argv[argv.index("--dataset_config") + 1] = str(bad_toml)
    with pytest.raises(Exception, match="nope"):
        sdxl_train_network.main(argv)
    assert _no_output(out)
    # a dataset TOML with an unknown key
    bad_toml.write_text(
        f"[general]\nresolutoin = 64\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{tiny['img_dir']}'\n"
    )
    with pytest.raises(ValueError, match="resolutoin"):
        sdxl_train_network.main(argv)
    assert _no_output(out)
    # a network module that does not import
    with pytest.raises(ImportError, match="--network_module 'networks.nope' cannot be imported"):
        sdxl_train_network.main(_argv(tiny, out, "--network_module", "networks.nope"))
    assert _no_output(out)
    # a checkpoint that is not SDXL
    not_sdxl = tmp_path / "vae_only.safetensors"
    from safetensors.torch import save_file

    save_file({"first_stage_model.encoder.conv_in.weight": torch.zeros(1)}, str(not_sdxl))
    argv = _argv(tiny, out, *lora)
    argv[argv.index("--pretrained_model_name_or_path") + 1] = str(not_sdxl)
    with pytest.raises(ValueError, match="vae_only.safetensors"):
        sdxl_train_network.main(argv)
    assert _no_output(out)
    # an output dir that is not writable (a path below a regular file)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="--output_dir .* not writable"):
        sdxl_train_network.main(_argv(tiny, blocker / "out", *lora))
    # an unknown flag
    with pytest.raises(SystemExit):
        sdxl_train_network.main(_argv(tiny, out, *lora, "--learning_rat3", "1"))
    assert _no_output(out)


RANK_SCRIPT = """
import os, sys
sys.path.insert(0, {root!r})
from safetensors.torch import save_file
from library.sdxl.trainer import SdxlArchitecture
from library.training.args import parse_args
from library.training.loop import train
from sdxl_train_network import setup_parser

args = parse_args(setup_parser(), sys.argv[1:])
res = train(args, SdxlArchitecture())
sd = {{k: v.detach().contiguous().cpu() for k, v in res.network.state_dict().items()}}
save_file(sd, os.path.join(args.output_dir, "rank%s.safetensors" % os.environ["RANK"]))
"""


def test_ddp_two_cpu_processes_keep_identical_weights(tiny, tmp_path):
    import socket
    import subprocess
    import sys

    root = Path(sdxl_train_network.__file__).resolve().parent
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT.format(root=str(root)))
    # batch size 1: each rank trains on different images, so equal weights need the gradient all-reduce
    toml_path = tmp_path / "bs1.toml"
    toml_path.write_text(tiny["toml"].read_text().replace(f"batch_size = {N_IMAGES}", "batch_size = 1"))
    argv = _argv(tiny, tmp_path / "out", "--network_module", "networks.lora", "--learning_rate", "1e-2",
                 "--max_train_steps", "2")  # fmt: skip
    argv[argv.index("--dataset_config") + 1] = str(toml_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(script), *argv]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0 = load_file(str(tmp_path / "out" / "rank0.safetensors"))
    w1 = load_file(str(tmp_path / "out" / "rank1.safetensors"))
    assert set(w0) == set(w1)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    ups = [k for k in w0 if k.endswith("lora_up.weight")]
    assert any(w0[k].abs().sum() > 0 for k in ups)  # the network did train
    assert (tmp_path / "out" / "net.safetensors").is_file()
