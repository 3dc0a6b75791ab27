"""Regression tests for integration bugs found by running the project the way an sd-scripts user does.

Each test names the user-visible flow it guards. Everything runs on tiny models built from config.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from library.sdxl.keymap import unet_key_mapper
from library.sdxl.loading import build_tiny_sdxl_models
from networks import loha, lokr

_SGM_BLOCKS = {"Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"}


def _sgm_mirror(unet: nn.Module) -> nn.Module:
    """A module tree at sd-scripts' SGM paths (`input_blocks.4.1...`) with its block class names,
    sharing the diffusers UNet's Linear/Conv2d leaves.

    LyCORIS names modules from `named_modules()` of sd-scripts' own UNet; this mirror lets the
    oracle see the tiny diffusers UNet the way it would see a real SDXL checkpoint in sd-scripts.
    """
    key_to_sgm = unet_key_mapper(list(unet.config.up_block_types), unet.config.layers_per_block)
    classes: dict[str, type] = {}

    def node_of(cls: str) -> nn.Module:
        return classes.setdefault(cls, type(cls, (nn.Module,), {}))()

    root = node_of("SdxlUNet2DConditionModel")
    for bname, block in unet.named_modules():
        if type(block).__name__ not in _SGM_BLOCKS:
            continue
        for sname, leaf in block.named_modules():
            if not isinstance(leaf, (nn.Linear, nn.Conv2d)):
                continue
            sgm = key_to_sgm(f"{bname}.{sname}.weight")
            parts = sgm[: -len(".weight")].split(".")
            block_depth = 2 if parts[0] == "middle_block" else 3  # middle_block.1 / input_blocks.4.1
            node = root
            for i, part in enumerate(parts[:-1]):
                if not hasattr(node, part):
                    node.add_module(
                        part, node_of(type(block).__name__ if i == block_depth - 1 else "Container")
                    )
                node = getattr(node, part)
            node.add_module(parts[-1], leaf)
    return root


LYCO_CASES = [
    (loha, 4, {"conv_dim": 2, "conv_alpha": 1}),
    (lokr, 4, {"factor": 4, "decompose_both": True}),
]


@pytest.mark.parametrize("module,dim,kwargs", LYCO_CASES, ids=["loha-conv", "lokr-decompose_both"])
def test_saved_sdxl_file_loads_in_lycoris_with_same_delta(tmp_path, clip_tokenizer_dir, module, dim, kwargs):
    """Flow: train on SDXL here, load the file in LyCORIS/sd-scripts. Every U-Net and TE2 module of the
    file must get a LyCORIS module at the same SGM name with the same ΔW (TE1 is left out: under
    transformers 5 `CLIPTextModel` has no `text_model` level, so LyCORIS cannot name it)."""
    from lycoris import kohya as lyco_kohya

    models = build_tiny_sdxl_models(clip_tokenizer_dir)
    tes = [models.text_encoder_1, models.text_encoder_2]
    net = module.create_network(1.0, dim, 2, None, tes, models.unet, **kwargs)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # trained-looking factors: the zero-initialised one must not hide a mismatch
        for p in net.parameters():
            if p.dim() > 0:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    path = tmp_path / "net.safetensors"
    net.save_weights(str(path), None, {"ss_network_module": module.__name__})
    file_names = {k.split(".")[0] for k in load_file(str(path))}

    logging.getLogger("lycoris").setLevel(logging.ERROR)
    lnet, _ = lyco_kohya.create_network_from_weights(
        1.0, str(path), None, [nn.Module(), models.text_encoder_2], _sgm_mirror(models.unet)
    )
    lyco = {m.lora_name: m for m in lnet.unet_loras + lnet.text_encoder_loras}
    expected = {n for n in file_names if not n.startswith("lora_te1_")}
    assert set(lyco) == expected
    assert any("_op" in n or "_in_layers_2" in n for n in expected) == ("conv_dim" in kwargs)

    ours = {m.lora_name: m for m in net.all_loras}
    for name, lm in lyco.items():
        om = ours[name]
        want = om.delta_weight_scaled(om.total_scale(1.0)).detach().reshape(om.layer_shape)
        got = (lm.get_weight(lm.shape) * lm.scalar).detach().reshape(want.shape)
        assert want.abs().max() > 0, name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()), msg=name)


def test_block_swap_on_a_dit_too_small_to_swap_is_one_clear_error(tokenizers_dir: Path):
    """Flow: `anima_train_network.py --blocks_to_swap 1` on a 2-block DiT said "between 1 and 0"."""
    from library.anima.loading import build_tiny_anima_models
    from library.anima.trainer import enable_block_swap

    dit = build_tiny_anima_models(tokenizers_dir).dit
    assert len(dit.blocks) == 2
    with pytest.raises(ValueError, match=r"only 2 blocks .* needs at least 3 .*remove --blocks_to_swap"):
        enable_block_swap(dit, 1, "cpu")


def test_anima_png_size_metadata_is_width_x_height():
    """Flow: `anima_minimal_inference.py --from_file` line `--w 64 --h 48` wrote a 64×48 PNG whose
    `size` text said 48x64 (height first)."""
    import argparse

    import anima_minimal_inference as inf

    base = inf.Job("p", "", height=1024, width=1024, steps=2, guidance_scale=3.5, flow_shift=5.0, seed=1)
    job = inf._parse_prompt_line("a cat --w 64 --h 48", base)
    assert (job.width, job.height) == (64, 48)
    text = inf._png_text(job, argparse.Namespace(lora_weight=[], resolved_mults=[]))
    assert text["size"] == "64x48"


@pytest.mark.parametrize(
    "subset_key,flag",
    [("shuffle_caption = true", "--cache_text_encoder_outputs"), ("random_crop = true", "--cache_latents")],
)
def test_cache_clash_is_refused_when_the_dataset_is_built(tmp_path: Path, subset_key: str, flag: str):
    """Flow: the seed's SDXL command with `--cache_text_encoder_outputs` and a TOML with `shuffle_caption`
    stopped only after the checkpoint was loaded, fp8-converted and the latents cached."""
    import argparse

    import numpy as np
    from PIL import Image

    from library.data import build_dataset_group
    from library.data.config import add_dataset_arguments

    img = tmp_path / "img"
    img.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(img / "a.png")
    toml_path = tmp_path / "d.toml"
    toml_path.write_text(
        f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{img}'\n{subset_key}\n"
    )
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser, text_encoder_caching=True)
    base = ["--dataset_config", str(toml_path), "--max_data_loader_n_workers", "0"]
    assert len(build_dataset_group(parser.parse_args(base))) == 1  # fine without a cache
    with pytest.raises(ValueError, match=f"{subset_key.split()[0]} cannot be used with"):
        build_dataset_group(parser.parse_args(base + [flag]))


def test_min_bucket_reso_below_one_step_is_one_clear_error():
    """Flow: `--resolution 64 --enable_bucket --min_bucket_reso 32` with the default step 64 rounded the
    minimum down to 0 and crashed with ZeroDivisionError while making buckets."""
    from library.data.buckets import adjust_min_max_bucket_reso

    assert adjust_min_max_bucket_reso((64, 64), 64, 100, 64) == (64, 128)
    assert adjust_min_max_bucket_reso((64, 64), 40, 128, 32) == (32, 128)
    with pytest.raises(ValueError, match=r"min_bucket_reso \(32\) is smaller than bucket_reso_steps \(64\)"):
        adjust_min_max_bucket_reso((64, 64), 32, 128, 64)
    with pytest.raises(ValueError, match="bucket_reso_steps must be a positive integer, got 0"):
        adjust_min_max_bucket_reso((64, 64), 64, 128, 0)


def test_caption_file_with_a_byte_order_mark(tmp_path: Path):
    """Flow: a caption saved by a Windows editor (UTF-8 with BOM) trained on "\\ufeffbom caption" as its
    first tag (visible in ss_tag_frequency)."""
    from library.data.captions import read_caption_file

    (tmp_path / "a.txt").write_bytes("\ufeffbom caption, x\nsecond".encode())
    (tmp_path / "b.txt").write_text("plain, y", encoding="utf-8")
    assert read_caption_file(tmp_path / "a.png", ".txt", False) == "bom caption, x"
    assert read_caption_file(tmp_path / "a.png", ".txt", True) == "bom caption, x\nsecond"
    assert read_caption_file(tmp_path / "b.png", ".txt", False) == "plain, y"


def test_dataset_toml_and_metadata_json_with_a_byte_order_mark(tmp_path: Path):
    """Flow: a dataset TOML / fine-tuning metadata JSON saved with a BOM failed to parse
    ("invalid character in key name" / "Unexpected UTF-8 BOM")."""
    import argparse
    import json

    import numpy as np
    from PIL import Image

    from library.data import build_dataset_group
    from library.data.config import add_dataset_arguments

    img = tmp_path / "img"
    img.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(img / "a.png")
    meta = tmp_path / "meta.json"
    meta.write_bytes(b"\xef\xbb\xbf" + json.dumps({"a": {"caption": "a cat"}}).encode())
    cfg = tmp_path / "d.toml"
    text = f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{img}'\nmetadata_file = '{meta}'\n"
    cfg.write_bytes(b"\xef\xbb\xbf" + text.encode())
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    group = build_dataset_group(
        parser.parse_args(["--dataset_config", str(cfg), "--max_data_loader_n_workers", "0"])
    )
    (info,) = group.datasets[0].image_data.values()
    assert info.caption == "a cat"


def test_anima_dit_given_to_an_sdxl_script_is_named():
    """Flow: `gen_img.py --ckpt anima-preview.safetensors` said "it looks like not an SDXL layout"."""
    from library.sdxl.single_file import check_sdxl_state

    dit_like = {
        "net.blocks.0.self_attn.q_proj.weight": torch.zeros(1),
        "net.llm_adapter.embed.weight": torch.zeros(1),
    }
    with pytest.raises(
        ValueError, match=r"is not an SDXL single-file checkpoint: it looks like an Anima DiT"
    ):
        check_sdxl_state(dit_like, "anima.safetensors")
    with pytest.raises(ValueError, match="it looks like another kind of model"):
        check_sdxl_state({"foo.weight": torch.zeros(1)}, "x.safetensors")


def test_anima_file_with_lycoris_te1_prefix_is_merged_not_called_sdxl(tmp_path: Path, tokenizers_dir: Path):
    """Flow: `anima_train_network.py --network_module lycoris.kohya` writes the Qwen3 modules as
    `lora_te1_layers_…` (LyCORIS indexes a list of encoders); anima_minimal_inference refused the file
    as "an SDXL LoRA"."""
    from safetensors.torch import save_file

    import anima_minimal_inference as inf
    from library.anima.loading import build_tiny_anima_models
    from library.inference.lora_merge import looks_like_sdxl

    m = build_tiny_anima_models(tokenizers_dir)
    net = lokr.create_network(1.0, 4, 1, None, [m.text_encoder], m.dit)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05)
    sd = {k: v.detach() for k, v in net.state_dict().items()}
    n_te = len({k.split(".")[0] for k in sd if k.startswith("lora_te_")})
    assert n_te > 0
    path = tmp_path / "lyco.safetensors"
    save_file({("lora_te1_" + k[8:] if k.startswith("lora_te_") else k): v for k, v in sd.items()}, str(path))
    te_before = {n: p.clone() for n, p in m.text_encoder.named_parameters()}
    (rep,) = inf.apply_lora_files(m.dit, m.text_encoder, [str(path)], [1.0])
    assert rep.matched == len({k.split(".")[0] for k in sd}) and not rep.unused
    assert any(not torch.equal(p, te_before[n]) for n, p in m.text_encoder.named_parameters())
    # real SDXL files, TE1-only ones included, are still recognised
    assert looks_like_sdxl(["lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha"])
    assert looks_like_sdxl(["lora_unet_input_blocks_4_1_proj_in.alpha"])
    assert not looks_like_sdxl(["lora_te1_layers_0_mlp_up_proj.alpha", "lora_unet_blocks_0_mlp_layer1.alpha"])


def test_converter_maps_lycoris_te1_keys_to_comfy_text_encoder_names():
    """Flow: converting a LyCORIS-trained Anima file for ComfyUI left its `lora_te1_…` keys unconverted
    (with a warning), so ComfyUI ignored the text-encoder part."""
    from networks.convert_anima_lora_to_comfy import from_comfy, to_comfy

    t = torch.ones(2, 2)
    sd = {"lora_te1_layers_0_mlp_up_proj.lokr_w1": t, "lora_te_layers_1_self_attn_q_proj.alpha": t}
    out = to_comfy(sd)
    assert set(out) == {
        "text_encoders.qwen3_06b.transformer.model.layers.0.mlp.up_proj.lokr_w1",
        "text_encoders.qwen3_06b.transformer.model.layers.1.self_attn.q_proj.alpha",
    }
    assert set(from_comfy(out)) == {
        "lora_te_layers_0_mlp_up_proj.lokr_w1",
        "lora_te_layers_1_self_attn_q_proj.alpha",
    }


def test_lycoris_network_module_on_sdxl_is_refused_with_the_replacement():
    """Flow: the docs' `--network_module lycoris.kohya --network_args algo=loha` for SDXL ended in LyCORIS'
    AssertionError "duplicated lora name: lora_unet_time_embedding_linear_1"."""
    from library.sdxl.loading import check_sdxl_network_module

    check_sdxl_network_module("networks.loha")
    with pytest.raises(
        ValueError, match=r"lycoris\.kohya: .*use networks\.loha, networks\.lokr or networks\.lora"
    ):
        check_sdxl_network_module("lycoris.kohya")


def test_anima_from_file_with_a_byte_order_mark(tmp_path: Path):
    """Flow: an Anima `--from_file` saved with a BOM put "\\ufeff" in front of the first prompt."""
    import anima_minimal_inference as inf

    f = tmp_path / "p.txt"
    f.write_bytes("\ufeff1girl --w 64\n# note\n\n  cat  \n".encode())
    assert inf.read_prompt_lines(str(f)) == ["1girl --w 64", "cat"]
    with pytest.raises(FileNotFoundError, match="--from_file"):
        inf.read_prompt_lines(str(tmp_path / "missing.txt"))


def test_sample_prompt_files_in_toml_and_json(tmp_path: Path):
    """Flow: `--sample_prompts prompts.toml` (sd-scripts' [prompt] + [[prompt.subset]] form) made one
    sample per TOML *line*, with prompts such as "[[prompt.subset]]"."""
    import json

    from library.inference.prompt_options import parse_prompt_line, read_prompt_file

    t = tmp_path / "p.toml"
    t.write_text(
        '[prompt]\nnegative_prompt = "lowres"\nwidth = 64\nheight = 96\nsample_steps = 3\nscale = 5.5\n\n'
        '[[prompt.subset]]\nprompt = "a cat"\nseed = 7\n\n[[prompt.subset]]\nprompt = "a dog"\nwidth = 128\n'
    )
    a, b = (parse_prompt_line(x) for x in read_prompt_file(t))
    assert (a.prompt, a.negative_prompt, a.width, a.height, a.steps, a.scale, a.seeds) == (
        "a cat", "lowres", 64, 96, 3, 5.5, [7]
    )  # fmt: skip
    assert (b.prompt, b.width, b.height, b.seeds) == ("a dog", 128, 96, None)
    j = tmp_path / "p.json"
    j.write_text(json.dumps([{"prompt": "x", "sample_sampler": "euler_a", "height": 32}, "y --w 48"]))
    c, d = (parse_prompt_line(x) for x in read_prompt_file(j))
    assert (c.prompt, c.sampler, c.height) == ("x", "euler_a", 32) and (d.prompt, d.width) == ("y", 48)
    txt = tmp_path / "p.txt"
    txt.write_bytes(b"\xef\xbb\xbfa bird --w 64\n# comment\n\nb\n")  # a BOM must not reach the prompt
    assert read_prompt_file(txt) == ["a bird --w 64", "b"]
    bad = tmp_path / "bad.toml"
    bad.write_text('[[prompt]]\nprompt = "x"\n')
    with pytest.raises(ValueError, match=r"\[\[prompt.subset\]\]"):
        read_prompt_file(bad)


def test_network_weights_of_another_kind_is_one_clear_error(tmp_path: Path, clip_tokenizer_dir: Path):
    """Flow: `--network_module networks.lora --network_weights my-lokr.safetensors` (or an Anima file)
    ended in a KeyError traceback instead of one `error:` line."""
    import numpy as np
    from PIL import Image

    import sdxl_train_network
    from library.sdxl.loading import save_sdxl_single_file

    models = build_tiny_sdxl_models(clip_tokenizer_dir)
    ckpt = tmp_path / "ckpt.safetensors"
    save_sdxl_single_file(models, ckpt)
    lokr_file = tmp_path / "lokr.safetensors"
    lokr.create_network(
        1.0, 4, 1, None, [models.text_encoder_1, models.text_encoder_2], models.unet
    ).save_weights(str(lokr_file), None, {})
    img = tmp_path / "img"
    img.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(img / "a.png")
    toml_path = tmp_path / "d.toml"
    toml_path.write_text(f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{img}'\n")
    argv = ["--pretrained_model_name_or_path", str(ckpt), "--tokenizer_cache_dir", str(clip_tokenizer_dir),
            "--dataset_config", str(toml_path), "--output_dir", str(tmp_path / "out"), "--max_train_steps", "1",
            "--max_data_loader_n_workers", "0", "--network_module", "networks.lora", "--network_dim", "4",
            "--network_weights", str(lokr_file)]  # fmt: skip
    with pytest.raises(ValueError, match=r"--network_weights .*lokr\.safetensors: .*lokr_w1"):
        sdxl_train_network.main(argv)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_gen_img_reads_a_file_given_with_lycoris_network_module(tmp_path: Path, clip_tokenizer_dir: Path):
    """Flow: sd-scripts' LyCORIS inference line `gen_img.py --network_module lycoris.kohya
    --network_weights my-loha.safetensors` crashed inside LyCORIS on the diffusers U-Net."""
    import argparse

    import gen_img

    models = build_tiny_sdxl_models(clip_tokenizer_dir)
    tes = [models.text_encoder_1, models.text_encoder_2]
    path = tmp_path / "loha.safetensors"
    loha.create_network(1.0, 4, 1, None, tes, models.unet).save_weights(str(path), None, {})
    args = argparse.Namespace(
        network_module=["lycoris.kohya"], network_weights=[str(path)], network_mul=None, network_args=None,
        network_merge=False, network_merge_n_models=None, network_show_meta=False, network_block_weights=None,
    )  # fmt: skip
    (net,) = gen_img.load_networks(args, models, torch.float32, torch.device("cpu"))
    assert net.module_name == "networks.lora" and net.algorithms == {"loha": 228} and not net.merged


def test_gen_img_ckpt_glob_with_one_match(tmp_path: Path, capsys):
    """Flow: `gen_img.py --ckpt "models/sdxl*.safetensors"` (sd-scripts resolves a single-match glob)
    said the model does not exist."""
    import gen_img

    (tmp_path / "sdxl_base.safetensors").write_bytes(b"x")
    args = gen_img.parse_args(["--ckpt", str(tmp_path / "sdxl*.safetensors"), "--prompt", "x"])
    assert args.ckpt == str(tmp_path / "sdxl_base.safetensors")
    (tmp_path / "sdxl_refiner.safetensors").write_bytes(b"x")
    with pytest.raises(SystemExit):
        gen_img.parse_args(["--ckpt", str(tmp_path / "sdxl*.safetensors"), "--prompt", "x"])
    assert "matches 2 paths" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit):
        gen_img.parse_args(["--ckpt", str(tmp_path / "sdxl_base.safetensors"), "--prompt", "x", "--outdir",
                            str(tmp_path / "a_file")])  # fmt: skip
    assert "exists and is not a folder" in capsys.readouterr().err


def test_config_file_with_a_byte_order_mark(tmp_path: Path):
    """Flow: `--config_file flags.toml` saved by a Windows editor failed with "unknown keys
    ['\\ufeffpretrained_model_name_or_path']"."""
    from safetensors.torch import save_file

    from library.training.args import parse_args
    from sdxl_train_network import setup_parser

    save_file(
        {"x": torch.zeros(1)}, str(tmp_path / "m.safetensors")
    )  # the model file is checked before loading
    (tmp_path / "d.toml").write_text("[[datasets]]\n")
    cfg = tmp_path / "flags.toml"
    text = (f"pretrained_model_name_or_path = '{tmp_path / 'm.safetensors'}'\ndataset_config = '{tmp_path / 'd.toml'}'\n"
            f"output_dir = '{tmp_path / 'out'}'\nnetwork_module = 'networks.loha'\nnetwork_dim = 8\n")  # fmt: skip
    cfg.write_bytes(b"\xef\xbb\xbf" + text.encode())
    args = parse_args(setup_parser(), ["--config_file", str(cfg)])
    assert args.network_module == "networks.loha" and args.network_dim == 8
