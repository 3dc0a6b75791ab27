"""gen_img.py with networks on a tiny SDXL written to disk: merged vs live, multipliers, stacking,
LoRA/LoHa/LoKr files, PNG output and bad network files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import gen_img
from library.io.png_metadata import read_png_text
from library.sdxl.loading import build_tiny_sdxl_models, save_sdxl_single_file

ALGOS = ("lora", "loha", "lokr")


def group_by_module(sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        name, _, suffix = key.partition(".")
        out.setdefault(name, {})[suffix] = value.double()
    return out


def delta_weight(t: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """ΔW of one Linear module from its file tensors, written from the published formulas (fp64)."""
    if "hada_w1_a" in t:  # LoHa: (W1a·W1b) ⊙ (W2a·W2b) · α/r
        r = t["hada_w1_b"].shape[0]
        dw = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * (t["alpha"] / r)
    elif "lora_down.weight" in t:  # LoRA: up·down · α/r
        r = t["lora_down.weight"].shape[0]
        dw = t["lora_up.weight"] @ t["lora_down.weight"] * (t["alpha"] / r)
    else:  # LoKr: W1 ⊗ W2, α/r only when a side is low-rank
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        low = [t[k].shape[0] for k in ("lokr_w1_b", "lokr_w2_b") if k in t]
        dw = torch.kron(w1, w2) * ((t["alpha"] / low[-1]) if low else 1.0)
    return dw.reshape(shape)


@pytest.fixture(scope="module")
def files(tmp_path_factory, clip_tokenizer_dir) -> dict[str, Path]:
    """A tiny SDXL checkpoint and one random (non-zero) network file per algorithm, TE + U-Net."""
    import networks.loha
    import networks.lokr
    import networks.lora

    d = tmp_path_factory.mktemp("genimg")
    m = build_tiny_sdxl_models(clip_tokenizer_dir, seed=0)
    out = {"ckpt": d / "tiny.safetensors", "dir": d, "tok": Path(clip_tokenizer_dir)}
    save_sdxl_single_file(m, out["ckpt"])
    for i, (algo, mod) in enumerate(zip(ALGOS, (networks.lora, networks.loha, networks.lokr))):
        # conv layers too (LoCon, Tucker LoHa, LoKr with full and low-rank W2): every file layout
        kw = {"conv_dim": "4", "conv_alpha": "2"}
        kw.update({"lora": {}, "loha": {"use_tucker": "true"}, "lokr": {"factor": "4"}}[algo])
        net = mod.create_network(1.0, 4, 2.0, m.vae, [m.text_encoder_1, m.text_encoder_2], m.unet, **kw)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in net.parameters():  # trained-looking weights: the default init is a no-op
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        out[algo] = d / f"{algo}.safetensors"
        net.save_weights(out[algo], None, {})
    return out


def _argv(files: dict[str, Path], *extra: str) -> list[str]:
    return ["--ckpt", str(files["ckpt"]), "--tokenizer_dir", str(files["tok"]), "--W", "32", "--H", "32",
            "--steps", "1", "--sampler", "euler", *extra]  # fmt: skip


def _load(files: dict[str, Path], *extra: str):
    """Models + networks exactly as gen_img.py loads them."""
    args = gen_img.parse_args([*_argv(files, "--prompt", "x"), *extra])
    dtype, dev = gen_img.pick_dtype(args), gen_img.pick_device(args)
    models = gen_img.load_models(args, dtype, dev)
    return models, gen_img.load_networks(args, models, dtype, dev)


@torch.no_grad()
def _outputs(models) -> dict[str, torch.Tensor]:
    """U-Net noise prediction and both text encoders' states on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    cfg = models.unet.config
    sample = torch.randn(1, 4, 4, 4, generator=g)
    ctx = torch.randn(1, 77, cfg.cross_attention_dim, generator=g)
    te_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    cond = {
        "text_embeds": torch.randn(1, te_dim, generator=g),
        "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]]),
    }
    ids = torch.tensor([[49406, 320, 2368, 49407] + [49407] * 73])
    return {
        "unet": models.unet(sample, 500, encoder_hidden_states=ctx, added_cond_kwargs=cond).sample,
        "te1": models.text_encoder_1(ids).last_hidden_state,
        "te2": models.text_encoder_2(ids).text_embeds,
    }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def base_outputs(files) -> dict[str, torch.Tensor]:
    models, _ = _load(files)
    return _outputs(models)


@pytest.mark.parametrize("algo", ALGOS)
def test_each_algorithm_loads_changes_output_and_merged_equals_live(files, base_outputs, algo) -> None:
    live_models, nets = _load(
        files, "--network_module", f"networks.{algo}", "--network_weights", str(files[algo])
    )
    assert not nets[0].merged and nets[0].algorithms == {algo: 293}  # 245 Linear + 48 Conv2d
    live = _outputs(live_models)
    merged_models, nets = _load(
        files,
        "--network_module",
        f"networks.{algo}",
        "--network_weights",
        str(files[algo]),
        "--network_merge",
    )
    assert nets[0].merged and nets[0].network is None
    merged = _outputs(merged_models)
    for part in ("unet", "te1", "te2"):
        assert _rel(live[part], base_outputs[part]) > 1e-2, f"{algo} did not change {part}"
        assert _rel(merged[part], live[part]) < 1e-4, f"{algo} merged != live on {part}"


def test_two_networks_stack_additively(files, base_outputs) -> None:
    both = ("--network_module", "networks.loha", "networks.lokr", "--network_weights", str(files["loha"]),
            str(files["lokr"]), "--network_mul", "0.8", "0.5")  # fmt: skip
    base_models, _ = _load(files)
    merged_models, nets = _load(files, *both, "--network_merge")
    assert [n.multiplier for n in nets] == [0.8, 0.5] and all(n.merged for n in nets)
    # merged U-Net and TE weights = base + 0.8·ΔW_loha + 0.5·ΔW_lokr, ΔW from an independent implementation
    from networks.arch import detect_architecture
    from networks.network_base import iter_all_leaves, lora_name_of, model_roots

    def leaves(models) -> dict[str, torch.nn.Module]:
        tes = [models.text_encoder_1, models.text_encoder_2]
        roots = model_roots(detect_architecture(tes, models.unet), tes, models.unet, None)
        # items are (original, leaf) or (original, model path, leaf) depending on the networks' version
        return {lora_name_of(r.prefix, it[0]): it[-1] for r in roots for it in iter_all_leaves(r)}

    base_l, merged_l = leaves(base_models), leaves(merged_models)
    g1, g2 = group_by_module(load_file(files["loha"])), group_by_module(load_file(files["lokr"]))
    assert set(g1) == set(g2) and len(g1) == 293
    worst, checked = 0.0, 0
    for name in g1:
        w0 = base_l[name].weight
        if w0.dim() != 2:  # conv layers: covered by live == merged outputs below
            continue
        checked += 1
        expect = w0.double() + 0.8 * delta_weight(g1[name], w0.shape) + 0.5 * delta_weight(g2[name], w0.shape)
        worst = max(worst, _rel(merged_l[name].weight.double(), expect))
    assert checked == 245 and worst < 1e-5  # 228 attention/MLP + 17 resnet time-embedding Linear
    # the same two networks live (modules, multipliers 0.8/0.5), or only the first merged, give the
    # merged outputs
    live_models, nets = _load(files, *both)
    half_models, half_nets = _load(files, *both, "--network_merge_n_models", "1")
    assert [n.merged for n in half_nets] == [True, False]
    live, half, merged = _outputs(live_models), _outputs(half_models), _outputs(merged_models)
    for part in ("unet", "te1", "te2"):
        assert _rel(live[part], merged[part]) < 1e-4
        assert _rel(half[part], merged[part]) < 1e-4
        assert _rel(live[part], base_outputs[part]) > 1e-2


def test_module_algorithm_mismatch_is_an_error_but_mixed_files_load(files, tmp_path) -> None:
    # issue 5: --network_module networks.lora with a pure LoHa file is a clear error naming the right module
    with pytest.raises(
        ValueError, match=r"networks\.lora does not match .*use --network_module networks\.loha"
    ):
        _load(files, "--network_module", "networks.lora", "--network_weights", str(files["loha"]))
    # a file mixing algorithms per module (LyCORIS presets) loads through any of our modules, each module
    # with its own algorithm (spec §4.3): half the LoHa modules replaced by the LoRA file's
    from safetensors.torch import load_file, save_file

    loha, lora = load_file(str(files["loha"])), load_file(str(files["lora"]))
    names = sorted({k.split(".", 1)[0] for k in loha})
    swap = set(names[::2])
    mixed = {k: v for k, v in loha.items() if k.split(".", 1)[0] not in swap}
    mixed.update({k: v for k, v in lora.items() if k.split(".", 1)[0] in swap})
    mixed_path = tmp_path / "mixed.safetensors"
    save_file(mixed, str(mixed_path))
    a, _ = _load(files, "--network_module", "networks.lora", "--network_weights", str(mixed_path))
    b, _ = _load(files, "--network_module", "networks.loha", "--network_weights", str(mixed_path))
    oa, ob = _outputs(a), _outputs(b)
    assert all(torch.equal(oa[k], ob[k]) for k in oa)


def test_images_multiplier_zero_is_pixel_identical_and_png_metadata(files, capsys) -> None:
    out = files["dir"] / "out_mul"
    prompts = files["dir"] / "prompts.txt"
    prompts.write_text("a cat --n dog --d 5 --am 0\na cat --n dog --d 5 --am 1\n", encoding="utf-8")
    net = (
        "--network_module",
        "networks.loha",
        "--network_weights",
        str(files["loha"]),
        "--network_mul",
        "0.7",
    )
    assert (
        gen_img.main(
            _argv(files, "--from_file", str(prompts), "--outdir", str(out), "--sequential_file_name", *net)
        )
        == 0
    )
    assert gen_img.main(_argv(files, "--prompt", "a cat --n dog --d 5", "--outdir", str(out / "base"))) == 0
    (base_png,) = sorted((out / "base").glob("*.png"))
    assert re.fullmatch(r"im_\d{14}_000_5\.png", base_png.name)
    mul0, mul1 = out / "im_000001.png", out / "im_000002.png"
    base, img0, img1 = _png(base_png), _png(mul0), _png(mul1)
    assert base.shape == (32, 32, 3)
    assert np.array_equal(img0, base)  # multiplier 0 = no network, pixel for pixel
    # multiplier 1 changes the image (a random tiny U-Net moves 1-step pixels only a little)
    assert np.count_nonzero(img1 != base) > 100 and np.abs(img1 - base).mean() > 0.05
    text = read_png_text(mul1)
    assert text["prompt"] == "a cat" and text["negative-prompt"] == "dog" and text["seed"] == "5"
    assert (text["sampler"], text["steps"], text["scale"]) == ("euler", "1", "7.5")
    assert text["original-width"] == "32" and text["crop-left"] == "0"
    assert text["raw-prompt"] == "a cat --n dog --d 5 --am 1"
    assert json.loads(text["networks"]) == [
        {"module": "networks.loha", "weights": "loha.safetensors", "multiplier": 1.0, "merged": False}
    ]
    assert "networks" not in read_png_text(base_png)
    # the same network merged into the weights gives the live image (multiplier 1) within rounding
    merged_out = out / "merged"
    merged_net = (*net[:-1], "1.0", "--network_merge")
    assert (
        gen_img.main(
            _argv(files, "--prompt", "a cat --n dog --d 5", "--outdir", str(merged_out), *merged_net)
        )
        == 0
    )
    (merged_png,) = merged_out.glob("*.png")
    assert np.abs(_png(merged_png) - img1).max() <= 1


def _expect_error(files, capsys, *extra: str) -> str:
    assert gen_img.main(_argv(files, "--prompt", "x", "--outdir", str(files["dir"] / "never"), *extra)) == 2
    assert not (files["dir"] / "never").exists()
    return capsys.readouterr().err


def test_weights_for_another_architecture_is_one_clear_error(files, capsys) -> None:
    anima = files["dir"] / "anima_lora.safetensors"
    save_file(
        {
            "lora_unet_blocks_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 64),
            "lora_unet_blocks_0_self_attn_q_proj.lora_up.weight": torch.zeros(64, 4),
            "lora_unet_blocks_0_self_attn_q_proj.alpha": torch.tensor(4.0),
        },
        str(anima),
    )
    err = _expect_error(files, capsys, "--network_module", "networks.lora", "--network_weights", str(anima))
    assert "none of its 1 modules match this SDXL model" in err and "another architecture" in err


def test_keys_matching_no_module_are_listed_and_stop_the_run(files, capsys) -> None:
    sd = load_file(files["lokr"])
    for stray in ("lora_unet_input_blocks_99_1_proj_in", "lora_te1_text_model_final_thing"):
        sd[f"{stray}.lora_down.weight"] = torch.zeros(4, 8)
        sd[f"{stray}.lora_up.weight"] = torch.zeros(8, 4)
    bad = files["dir"] / "stray.safetensors"
    save_file(sd, str(bad))
    err = _expect_error(files, capsys, "--network_module", "networks.lokr", "--network_weights", str(bad))
    assert "2 of 295 modules in the file match no layer" in err
    assert "lora_unet_input_blocks_99_1_proj_in" in err and "lora_te1_text_model_final_thing" in err


def test_am_with_only_merged_networks_is_an_error(files, capsys) -> None:
    err = _expect_error(
        files, capsys, "--network_module", "networks.lora", "--network_weights", str(files["lora"]),
        "--network_merge", "--prompt", "x --am 0.5",
    )  # fmt: skip
    assert "no live network" in err


def test_bf16_merged_batch_with_fp32_vae_writes_images(files) -> None:
    out = files["dir"] / "out_bf16"
    argv = _argv(
        files, "--prompt", "a dog --d 1,2", "--images_per_prompt", "2", "--batch_size", "2", "--bf16",
        "--no_half_vae", "--network_module", "networks.lokr", "--network_weights", str(files["lokr"]),
        "--network_merge", "--outdir", str(out),
    )  # fmt: skip
    assert gen_img.main(argv) == 0
    pngs = sorted(out.glob("*.png"))
    assert [re.sub(r"\d{14}", "T", p.name) for p in pngs] == ["im_T_000_1.png", "im_T_001_2.png"]
    a, b = _png(pngs[0]), _png(pngs[1])
    assert a.shape == (32, 32, 3) and not np.array_equal(a, b)  # different seeds, different images
    assert json.loads(read_png_text(pngs[1])["networks"])[0]["merged"] is True


def test_unreadable_or_unsupported_network_files_are_clear_errors(files, capsys) -> None:
    garbage = files["dir"] / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    err = _expect_error(files, capsys, "--network_module", "networks.lora", "--network_weights", str(garbage))
    assert "--network_weights" in err and "garbage.safetensors: a text file, not a tensor file" in err
    dora = files["dir"] / "dora.safetensors"
    save_file(
        {"lora_unet_out_2.dora_scale": torch.ones(4), "lora_unet_out_2.alpha": torch.tensor(1.0)}, str(dora)
    )
    err = _expect_error(files, capsys, "--network_module", "networks.lora", "--network_weights", str(dora))
    assert "lora_unet_out_2.dora_scale: unsupported network key" in err


def test_script_runs_from_another_folder(files, tmp_path) -> None:
    """`python gen_img.py ...` as users type it: the script's folder provides `library` and `networks.*`."""
    import subprocess
    import sys

    script = Path(gen_img.__file__).resolve()
    argv = _argv(files, "--prompt", "a fox --d 3", "--outdir", "o", "--network_module", "networks.lokr",
                 "--network_weights", str(files["lokr"]), "--sdxl", "--sdpa")  # fmt: skip
    r = subprocess.run(
        [sys.executable, str(script), *argv], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (png,) = (tmp_path / "o").glob("*.png")
    assert png.name.endswith("_000_3.png") and read_png_text(png)["prompt"] == "a fox"
    r = subprocess.run([sys.executable, str(script), "--bogus"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2 and "unrecognized arguments: --bogus" in r.stderr


@pytest.mark.parametrize("flag", ["--fp8_base", "--fp8_scaled"])
def test_fp8_base_flags(files, base_outputs, flag) -> None:
    from networks.fp8 import FP8_DTYPE

    net = ("--network_module", "networks.lokr", "--network_weights", str(files["lokr"]))
    models, _ = _load(files, flag)
    linears = [m for m in models.unet.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == FP8_DTYPE for m in linears)
    assert all(hasattr(m, "scale_weight") == (flag == "--fp8_scaled") for m in linears)
    out = _outputs(models)
    # e4m3 keeps 3 mantissa bits, ~2.5 % per layer, compounded through the tiny U-Net's and encoders' depth
    # (measured: 5-10 % of the largest output, scaled or not); a wrong scale or layout is off by O(1)
    errs = {p: _rel(out[p], base_outputs[p]) for p in out}
    assert all(0 < e < 0.2 for e in errs.values()), errs
    live_ref = _outputs(_load(files, *net)[0])
    live = _outputs(_load(files, flag, *net)[0])
    merged = _outputs(_load(files, flag, *net, "--network_merge")[0])
    # merged into fp8 × scale in fp32 and quantized again: the live network's output, to fp8 rounding
    errs = {p: (_rel(live[p], live_ref[p]), _rel(merged[p], live[p])) for p in out}
    assert all(a < 0.2 and b < 0.2 for a, b in errs.values()), errs
