"""anima_train_network.py on a tiny Anima: training lowers the loss, golden key lists, flags, bad input."""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import anima_train_network as trainer
from library.anima import loss as al
from library.anima import trainer as at
from library.anima.loading import (
    anima_encode_latents,
    build_tiny_anima_models,
    load_anima_dit,
    save_tiny_anima_files,
)
from library.anima.text import encode_qwen3, tokenize_anima_captions
from library.inference.lora_merge import merge_into_modules

CAPTIONS = ["a red square", "a blue square"]
TOKENS = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizers_dir) -> dict:
    root = tmp_path_factory.mktemp("anima_train")
    models = build_tiny_anima_models(tokenizers_dir, seed=0)
    files = save_tiny_anima_files(models, root / "models")
    img_dir = root / "img"
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    for i, cap in enumerate(CAPTIONS):
        a = np.zeros((64, 64, 3), np.uint8)
        a[:, :32] = (200, 30, 30) if i == 0 else (30, 30, 200)
        a[32:] += (rng.random((32, 64, 3)) * 60).astype(np.uint8)
        Image.fromarray(a).save(img_dir / f"{i}.png")
        (img_dir / f"{i}.txt").write_text(cap)
    toml = root / "data.toml"
    toml.write_text(
        '[general]\nresolution = 64\nenable_bucket = false\ncaption_extension = ".txt"\n'
        f'[[datasets]]\nbatch_size = 2\n[[datasets.subsets]]\nimage_dir = "{img_dir}"\nnum_repeats = 1\n'
    )
    return {"root": root, "files": files, "toml": toml, "img_dir": img_dir, "tok": tokenizers_dir}


def _argv(s: dict, out: Path, module: str, *extra: str) -> list[str]:
    f = s["files"]
    return [
        "--pretrained_model_name_or_path", str(f["dit"]), "--qwen3", str(f["text_encoder"]),
        "--t5_tokenizer_path", str(f["t5_tokenizer"]),
        "--vae", str(f["vae"]), "--dataset_config", str(s["toml"]), "--network_module", module,
        "--network_dim", "4", "--network_alpha", "2", "--learning_rate", "1e-2", "--optimizer_type", "AdamW",
        "--max_train_steps", "5", "--output_dir", str(out), "--output_name", "net", "--mixed_precision", "no",
        "--qwen3_max_token_length", str(TOKENS), "--t5_max_token_length", str(TOKENS), "--seed", "3", *extra,
    ]  # fmt: skip


def _fixed_batch_loss(s: dict, network_file: Path | None) -> float:
    """Mean flow-matching loss over fixed noise/sigma draws on both images, base (+ merged network)."""
    models = build_tiny_anima_models(s["tok"], seed=0)
    dit = load_anima_dit(s["files"]["dit"], torch.float32)
    models.dit = dit
    if network_file is not None:
        rep = merge_into_modules(
            [("lora_unet", dit), ("lora_te", models.text_encoder)], load_file(str(network_file)), 1.0
        )
        assert rep.matched > 0 and not rep.unused
    images = torch.stack(
        [torch.from_numpy(np.array(Image.open(s["img_dir"] / f"{i}.png"))).permute(2, 0, 1) for i in range(2)]
    )
    latents = anima_encode_latents(models.vae, images.float() / 127.5 - 1)
    toks = tokenize_anima_captions(models.qwen_tokenizer, models.t5_tokenizer, CAPTIONS, TOKENS, TOKENS)
    states = encode_qwen3(models.text_encoder, toks.qwen_ids, toks.qwen_mask)
    args = al.FlowLossConfig.from_args(argparse.Namespace(loss_type="l2", weighting_scheme="uniform"))
    g = torch.Generator().manual_seed(123)
    total = 0.0
    with torch.no_grad():
        ctx = dit.run_llm_adapter(states, toks.t5_ids, toks.t5_mask, toks.qwen_mask)
        for _ in range(6):
            noise = torch.randn(latents.shape, generator=g)
            sig = torch.rand(2, generator=g) * 0.9 + 0.05
            loss = al.flow_matching_loss(
                dit, latents, lambda: ctx, args, torch.ones(2), torch.float32, noise, sig
            )
            total += loss.mean().item()
    return total / 6


def _modules(path: Path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return {k.split(".")[0] for k in f.keys()}


DIT_GOLDEN = {
    f"lora_unet_blocks_{i}_{m}"
    for i in range(2)
    for m in [
        f"{a}_{p}" for a in ("self_attn", "cross_attn") for p in ("q_proj", "k_proj", "v_proj", "output_proj")
    ]
    + ["mlp_layer1", "mlp_layer2"]
}
ADAPTER_GOLDEN = {
    f"lora_unet_llm_adapter_blocks_{j}_{m}"
    for j in range(2)
    for m in [
        f"{a}_{p}" for a in ("self_attn", "cross_attn") for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    ]
    + ["mlp_0", "mlp_2"]
}
TE_GOLDEN = {
    f"lora_te_layers_{n}_{m}"
    for n in range(2)
    for m in (
        "self_attn_q_proj",
        "self_attn_k_proj",
        "self_attn_v_proj",
        "self_attn_o_proj",
        "mlp_gate_proj",
        "mlp_up_proj",
        "mlp_down_proj",
    )  # fmt: skip
}


@pytest.mark.parametrize(
    "module,extra,golden",
    [
        # LoRA: live text encoder trained too (no caches)
        ("networks.lora", ("--cache_latents",), DIT_GOLDEN | TE_GOLDEN),
        # LoHa: caches + adapter blocks, U-Net only
        (
            "networks.loha",
            (
                "--cache_latents",
                "--cache_text_encoder_outputs",
                "--network_train_unet_only",
                "--network_args",
                "train_llm_adapter=True",
            ),
            DIT_GOLDEN | ADAPTER_GOLDEN,
        ),  # fmt: skip
        # LoKr: gradient checkpointing, images encoded every step, shift sampling, adapter + text encoder
        (
            "networks.lokr",
            (
                "--gradient_checkpointing",
                "--timestep_sampling",
                "shift",
                "--discrete_flow_shift",
                "3",
                "--network_args",
                "train_llm_adapter=True",
            ),
            DIT_GOLDEN | ADAPTER_GOLDEN | TE_GOLDEN,
        ),  # fmt: skip
    ],
)
def test_training_lowers_loss_and_writes_golden_keys(setup, tmp_path, module, extra, golden):
    out = trainer.main(_argv(setup, tmp_path / "out", module, *extra))
    assert out is not None and out.is_file()
    assert _modules(out) == golden
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "anima-preview/lora"
    assert meta["ss_timestep_sampling"] == ("shift" if "shift" in extra else "sigmoid")
    assert meta["ss_network_module"] == module
    assert {"ss_weighting_scheme", "ss_sigmoid_scale", "ss_discrete_flow_shift", "sshs_model_hash"} <= set(
        meta
    )
    before, after = _fixed_batch_loss(setup, None), _fixed_batch_loss(setup, out)
    assert after < before * 0.97, (module, before, after)


def test_sample_images_during_training(setup, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square --w 64 --h 64 --s 2 --l 4 --fs 3 --d 5\n")
    out = tmp_path / "out"
    trainer.main(_argv(setup, out, "networks.lora", "--max_train_steps", "1", "--cache_latents",
                       "--cache_text_encoder_outputs", "--network_train_unet_only",
                       "--sample_prompts", str(prompts), "--sample_every_n_steps", "1"))  # fmt: skip
    pngs = sorted((out / "sample").glob("*.png"))
    assert len(pngs) == 1 and pngs[0].name.endswith("_5.png")
    img = Image.open(pngs[0])
    assert img.size == (64, 64) and img.text["seed"] == "5" and img.text["flow-shift"] == "3.0"


def test_timestep_sampling_and_weighting():
    def ns(**kw):
        base = dict(timestep_sampling="sigmoid", sigmoid_scale=1.0, discrete_flow_shift=1.0,
                    weighting_scheme="uniform", logit_mean=0.0, logit_std=1.0, mode_scale=1.29)  # fmt: skip
        return al.FlowLossConfig.from_args(argparse.Namespace(**{**base, **kw}))

    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    z = torch.randn(5, generator=g())
    torch.testing.assert_close(al.sample_sigmas(ns(sigmoid_scale=2.0), 5, (8, 8), g()), torch.sigmoid(2 * z))
    s = torch.sigmoid(z)
    torch.testing.assert_close(al.sample_sigmas(ns(timestep_sampling="shift", discrete_flow_shift=3.0), 5, (8, 8), g()),
                               3 * s / (1 + 2 * s))  # fmt: skip
    # flux_shift: mu = 0.5 at 256 tokens (latent 32x32), 1.15 at 4096 (latent 128x128)
    assert math.isclose(al.flux_shift_mu(32, 32), 0.5) and math.isclose(al.flux_shift_mu(128, 128), 1.15)
    mu = math.exp(0.5)
    torch.testing.assert_close(al.sample_sigmas(ns(timestep_sampling="flux_shift"), 5, (32, 32), g()),
                               mu / (mu + 1 / s - 1))  # fmt: skip
    torch.testing.assert_close(al.sample_sigmas(ns(timestep_sampling="uniform"), 5, (8, 8), g()),
                               torch.rand(5, generator=g()))  # fmt: skip
    # sigma: u from the density, index floor(1000u) into the shifted descending schedule
    sig = al.sample_sigmas(ns(timestep_sampling="sigma", discrete_flow_shift=3.0), 5, (8, 8), g())
    u = torch.rand(5, generator=g())
    t = 1 - torch.floor(u * 1000) / 1000
    torch.testing.assert_close(sig, 3 * t / (1 + 2 * t))
    sg = torch.tensor([0.25, 0.5])
    torch.testing.assert_close(al.loss_weighting("sigma_sqrt", sg), torch.tensor([16.0, 4.0]))
    torch.testing.assert_close(al.loss_weighting("cosmap", sg), 2 / (math.pi * (1 - 2 * sg + 2 * sg**2)))
    torch.testing.assert_close(al.loss_weighting("logit_normal", sg), torch.ones(2))


def test_flow_matching_loss_maths():
    """x_s = (1-s) x0 + s n, target n - x0: a DiT that returns the exact velocity has zero loss."""
    x0, n, s = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4), torch.tensor([0.25, 0.75])
    args = al.FlowLossConfig(loss_type="l2", weighting_scheme="uniform", ip_noise_gamma=None)
    seen = {}

    def oracle(x, t, ctx):
        seen["x"], seen["t"] = x, t
        return (n - x0)[:, :, None]

    loss = al.flow_matching_loss(oracle, x0, lambda: None, args, torch.ones(2), torch.float32, n, s)
    assert torch.equal(loss, torch.zeros(2))
    torch.testing.assert_close(seen["x"][:, :, 0], (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * n)
    torch.testing.assert_close(seen["t"], s)
    zero = lambda x, t, c: torch.zeros_like(x)  # noqa: E731
    l1 = al.flow_matching_loss(zero, x0, lambda: None, dataclasses.replace(args, loss_type="l1"),
                               torch.tensor([1.0, 2.0]), torch.float32, n, s)  # fmt: skip
    torch.testing.assert_close(l1, (n - x0).abs().mean(dim=(1, 2, 3)) * torch.tensor([1.0, 2.0]))


def test_bad_input(setup, tmp_path):
    argv = _argv(setup, tmp_path / "o", "networks.lora")
    no_te = [a for i, a in enumerate(argv) if a != "--qwen3" and (i == 0 or argv[i - 1] != "--qwen3")]
    with pytest.raises(ValueError, match="--qwen3 is required"):
        trainer.main(no_te)
    with pytest.raises(ValueError, match="v_parameterization does not apply"):
        trainer.main(argv + ["--v_parameterization"])
    with pytest.raises(ValueError, match="network_train_unet_only"):
        trainer.main(argv + ["--cache_text_encoder_outputs"])
    missing = list(argv)
    missing[missing.index("--qwen3") + 1] = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="Qwen3 text encoder not found"):
        trainer.main(missing)
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(sdxl))
    wrong = list(argv)
    wrong[wrong.index("--pretrained_model_name_or_path") + 1] = str(sdxl)
    with pytest.raises(ValueError, match="not an Anima DiT checkpoint"):
        trainer.main(wrong)
    assert not (tmp_path / "o").exists()  # nothing written on bad input


def test_cached_caption_dropout_equals_empty_caption(setup):
    arch = at.AnimaArchitecture()
    models = build_tiny_anima_models(setup["tok"], seed=0)
    arch.models = models
    args = argparse.Namespace(qwen3_max_token_length=TOKENS, t5_max_token_length=TOKENS)
    full = arch.encode_text_for_cache(args, CAPTIONS)
    empty = arch.encode_text_for_cache(args, ["", ""])
    keys = ("prompt_embeds", "attn_mask", "t5_input_ids", "t5_attn_mask")
    got = at.apply_cached_caption_dropout([1.0, 0.0], *(full[k] for k in keys))
    for k, t in zip(keys, got):
        assert torch.equal(t[0], empty[k][0].to(t.dtype)), k  # dropped row == encoding ""
        assert torch.equal(t[1], full[k][1].to(t.dtype)), k  # kept row unchanged
    assert empty["t5_input_ids"][0, :2].tolist() == [1, 0] and empty["attn_mask"].sum() == 0
    # rate 0.5 drops about half of many samples
    n = 400
    g = torch.Generator().manual_seed(0)
    rows = at.apply_cached_caption_dropout([0.5] * n, torch.ones(n, 2, 3), torch.ones(n, 2), torch.ones(n, 4),
                                           torch.ones(n, 4), generator=g)  # fmt: skip
    assert 150 < int((rows[1].sum(1) == 0).sum()) < 250


def test_block_swap_keeps_outputs(setup):
    from library.anima.model import Anima, tiny_anima_config

    cfg = tiny_anima_config()
    cfg.num_blocks = 4
    torch.manual_seed(0)
    dit = Anima(cfg)
    x, t, c = torch.randn(1, 16, 1, 8, 8), torch.tensor([0.5]), torch.randn(1, 8, 32)
    want = dit(x, t, c)
    handles = at.enable_block_swap(dit, 2, "cpu")
    assert len(handles) == 4
    assert torch.equal(dit(x, t, c), want)
    with pytest.raises(ValueError, match="between 1 and 2"):
        at.enable_block_swap(dit, 3, "cpu")


def test_dit_streams_onto_the_device_only_after_caching(setup, tmp_path, monkeypatch):
    """The VAE and Qwen3 caching runs before the DiT exists: on a GPU its weights (2.2 GiB under --fp8_base)
    would otherwise sit beside the VAE's activations and raise the run's peak by that much."""
    from library.anima import loading

    events: list[tuple] = []
    load_dit = loading.load_anima_dit

    def spy_load(path, dtype=None, device="cpu", **kw):
        events.append(("dit", torch.device(device), dtype, kw["fp8_base"]))
        return load_dit(path, dtype, device, **kw)

    def spy(name, method):
        def wrapped(self, *a):
            events.append((name, self.models.dit))
            return method(self, *a)

        return wrapped

    monkeypatch.setattr(loading, "load_anima_dit", spy_load)
    for name in ("encode_latents", "encode_text_for_cache"):
        monkeypatch.setattr(at.AnimaArchitecture, name, spy(name, getattr(at.AnimaArchitecture, name)))
    out = trainer.main(_argv(setup, tmp_path / "out", "networks.lokr", "--max_train_steps", "1",
                             "--mixed_precision", "bf16", "--fp8_base", "--cache_latents",
                             "--cache_text_encoder_outputs", "--network_train_unet_only"))  # fmt: skip
    assert out is not None and _modules(out) == DIT_GOLDEN  # the network was built on the loaded DiT
    kinds = [e[0] for e in events]
    # 2 images at batch 1, 2 captions in one batch, then the DiT once, in bf16 with fp8 Linear weights
    assert kinds == ["encode_latents", "encode_latents", "encode_text_for_cache", "dit"], kinds
    assert all(e[1] is None for e in events[:-1])  # no DiT anywhere while caching
    assert events[-1] == ("dit", torch.device("cpu"), torch.bfloat16, True)


def test_cached_models_give_their_memory_back_when_nothing_samples(setup, tmp_path, monkeypatch):
    """Without --sample_prompts, Qwen3 and the VAE are not used after caching: their weights leave the host
    (meta device) before the network is built; the run trains and saves the same DiT keys."""
    seen = {}
    build = at.AnimaArchitecture.network_targets

    def spy(self):
        m = self.models
        seen["devices"] = {p.device.type for mod in (m.text_encoder, m.vae) for p in mod.parameters()}
        return build(self)

    monkeypatch.setattr(at.AnimaArchitecture, "network_targets", spy)
    flags = (
        "--max_train_steps",
        "1",
        "--cache_latents",
        "--cache_text_encoder_outputs",
        "--network_train_unet_only",
    )
    out = trainer.main(_argv(setup, tmp_path / "out", "networks.lokr", *flags))
    assert out is not None and _modules(out) == DIT_GOLDEN
    assert seen["devices"] == {"meta"}
    # only the latents cached: Qwen3 encodes every step, so it keeps its weights; the VAE does not
    out = trainer.main(
        _argv(setup, tmp_path / "out2", "networks.lokr", "--max_train_steps", "1", "--cache_latents")
    )
    assert out is not None
    assert seen["devices"] == {"meta", "cpu"}
