"""Anima files in the released layouts: DiT (`net.`), Qwen3 folder / single file, VAE (Wan or diffusers
names), tokenizers; latent normalisation; clear errors for wrong or missing inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.anima.loading import (
    LATENTS_MEAN,
    LATENTS_STD,
    AnimaModels,
    anima_decode_latents,
    anima_encode_latents,
    build_tiny_anima_models,
    load_anima_dit,
    load_anima_models,
    load_anima_tokenizers,
    load_anima_vae,
    load_qwen3_text_encoder,
    save_tiny_anima_files,
)
from library.anima.text import encode_anima_prompts


@pytest.fixture(scope="module")
def tiny(
    tokenizers_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[AnimaModels, dict[str, Path]]:
    models = build_tiny_anima_models(tokenizers_dir, seed=0)
    return models, save_tiny_anima_files(models, tmp_path_factory.mktemp("anima_tiny"))


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_dit_file_has_released_layout_and_loads_exactly(tiny) -> None:
    models, paths = tiny
    with safe_open(str(paths["dit"]), "pt") as f:
        keys = list(f.keys())
        assert f.metadata() == {"format": "pt"}
        assert tuple(f.get_slice("net.x_embedder.proj.1.weight").get_shape()) == (64, 68)
        assert tuple(f.get_slice("net.blocks.1.cross_attn.k_proj.weight").get_shape()) == (64, 32)
    assert all(k.startswith("net.") for k in keys)
    assert len(keys) == 2 * 20 + 7 + (
        4 + 2 * 19
    )  # blocks + other DiT + adapter (embed/out_proj×2/norm + 19/block)
    assert "net.llm_adapter.blocks.1.mlp.2.bias" in keys and "net.t_embedding_norm.weight" in keys
    dit = load_anima_dit(paths["dit"])
    _same_state(dit, models.dit)
    assert dit.config.num_blocks == 2 and dit.config.model_channels == 64
    x, ctx = torch.randn(1, 16, 1, 8, 8), torch.randn(1, 6, 32)
    with torch.no_grad():
        ours, ref = dit(x, torch.tensor([0.4]), ctx), models.dit(x, torch.tensor([0.4]), ctx)
    # The tensors are equal (checked exactly above); two instances may still take different CPU kernel
    # paths (storage alignment picks the SIMD code), so outputs of magnitude ~2 agree to float32 rounding
    # (seen: 5e-7 here, 1e-5 on another machine). A wrong or swapped tensor moves them by O(1).
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    bf = load_anima_dit(paths["dit"], dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16 and not any(p.requires_grad for p in bf.parameters())


def test_dit_optional_rope_buffers_accepted_and_other_keys_rejected(tiny, tmp_path: Path) -> None:
    _, paths = tiny
    sd = load_file(str(paths["dit"]))
    extra = dict(sd)
    extra["net.pos_embedder.seq"] = torch.arange(256, dtype=torch.float32)
    extra["net.pos_embedder.dim_spatial_range"] = torch.arange(21, dtype=torch.float32)
    extra["net.pos_embedder.dim_temporal_range"] = torch.arange(22, dtype=torch.float32)
    save_file(extra, str(tmp_path / "with_buffers.safetensors"))
    assert load_anima_dit(tmp_path / "with_buffers.safetensors").config.num_blocks == 2
    bad = dict(sd)
    bad["net.blocks.0.self_attn.extra.weight"] = torch.zeros(1)
    save_file(bad, str(tmp_path / "unexpected.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected \['blocks.0.self_attn.extra.weight'\]"):
        load_anima_dit(tmp_path / "unexpected.safetensors")
    miss = {k: v for k, v in sd.items() if k != "net.blocks.1.mlp.layer2.weight"}
    save_file(miss, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['blocks.1.mlp.layer2.weight'\]"):
        load_anima_dit(tmp_path / "missing.safetensors")


def test_dit_of_another_architecture_is_a_clear_error(tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    from library.sdxl.config import tiny_sdxl_configs

    unet = UNet2DConditionModel(**tiny_sdxl_configs()["unet"])
    save_file(
        {"model.diffusion_model." + k: v.contiguous() for k, v in unet.state_dict().items()},
        str(tmp_path / "sdxl_unet.safetensors"),
    )
    with pytest.raises(ValueError, match=r"sdxl_unet\.safetensors is not an Anima DiT checkpoint"):
        load_anima_dit(tmp_path / "sdxl_unet.safetensors")
    with pytest.raises(FileNotFoundError, match="Anima DiT file not found"):
        load_anima_dit(tmp_path / "nope.safetensors")


def test_qwen3_folder_and_single_file_agree(tiny) -> None:
    models, paths = tiny
    assert json.loads((paths["text_encoder"] / "config.json").read_text())["num_hidden_layers"] == 2
    with safe_open(str(paths["text_encoder_file"]), "pt") as f:
        assert all(k.startswith("model.") for k in f.keys())
    te_dir = load_qwen3_text_encoder(paths["text_encoder"], dtype=torch.float32)
    te_file = load_qwen3_text_encoder(paths["text_encoder_file"], dtype=torch.float32)
    _same_state(te_dir, models.text_encoder)
    _same_state(te_file, models.text_encoder)
    assert type(te_file).__name__ == "Qwen3Model" and te_file.config.num_key_value_heads == 2
    ids = torch.tensor([[64, 8251, 151643]])
    mask = torch.tensor([[1, 1, 0]])
    with torch.no_grad():
        a = te_dir(input_ids=ids, attention_mask=mask).last_hidden_state
        b = te_file(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(a, b) and a.abs().max() > 0
    assert load_qwen3_text_encoder(paths["text_encoder_file"]).dtype == torch.bfloat16  # default: frozen bf16


def test_missing_text_encoder_is_a_clear_error(tiny, tmp_path: Path) -> None:
    _, paths = tiny
    with pytest.raises(ValueError, match="needs the Qwen3 text encoder"):
        load_qwen3_text_encoder(None)
    with pytest.raises(FileNotFoundError, match="Qwen3 text encoder not found"):
        load_qwen3_text_encoder(tmp_path / "no_qwen3")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no \\*.safetensors"):
        load_qwen3_text_encoder(tmp_path / "empty")
    with pytest.raises(ValueError, match="not a Qwen3 text encoder"):
        load_qwen3_text_encoder(paths["dit"])
    with pytest.raises(FileNotFoundError, match="Qwen3 text encoder not found"):
        load_anima_models(paths["dit"], tmp_path / "no_qwen3", paths["vae"], paths["t5_tokenizer"])


def test_tokenizers_from_text_encoder_folder_and_t5_path(tiny, tmp_path: Path) -> None:
    _, paths = tiny
    qwen, t5 = load_anima_tokenizers(paths["text_encoder"], paths["t5_tokenizer"])
    assert qwen("a cat", add_special_tokens=False)["input_ids"] == [64, 8251] and qwen.pad_token_id == 151643
    assert t5("a cat")["input_ids"] == [3, 9, 1712, 1] and t5.pad_token_id == 0
    with pytest.raises(FileNotFoundError, match="--t5_tokenizer_path"):
        load_anima_tokenizers(paths["text_encoder"], tmp_path / "missing_t5")


def test_vae_wan_names_and_diffusers_names_load(tiny) -> None:
    models, paths = tiny
    keys = set(load_file(str(paths["vae"])))
    for k in ("conv1.bias", "conv2.weight", "encoder.conv1.weight", "encoder.head.2.weight",
              "encoder.downsamples.0.residual.0.gamma", "encoder.downsamples.0.residual.6.weight",
              "encoder.downsamples.3.shortcut.weight", "encoder.downsamples.5.time_conv.weight",
              "encoder.middle.1.to_qkv.weight", "decoder.middle.2.residual.2.weight",
              "decoder.upsamples.3.resample.1.weight", "decoder.upsamples.4.shortcut.weight",
              "decoder.upsamples.14.residual.6.weight", "decoder.head.0.gamma"):  # fmt: skip
        assert k in keys, k
    assert not any("down_blocks" in k or "up_blocks" in k or "mid_block" in k for k in keys)
    _same_state(load_anima_vae(paths["vae"]), models.vae)
    _same_state(load_anima_vae(paths["vae_diffusers"]), models.vae)
    with pytest.raises(ValueError, match="not a Qwen-Image/Wan VAE"):
        load_anima_vae(paths["dit"])


def test_latent_normalisation_uses_real_mean_std(tiny) -> None:
    models, _ = tiny
    vae = models.vae
    torch.manual_seed(0)
    img = torch.rand(2, 3, 32, 48) * 2 - 1
    z = anima_encode_latents(vae, img)
    assert z.shape == (2, 16, 4, 6)
    with torch.no_grad():
        mu = vae.encode(img[:, :, None]).latent_dist.mode()[:, :, 0]
    mean, std = torch.tensor(LATENTS_MEAN).view(1, 16, 1, 1), torch.tensor(LATENTS_STD).view(1, 16, 1, 1)
    torch.testing.assert_close(z, (mu - mean) / std)
    dec = anima_decode_latents(vae, z)
    with torch.no_grad():
        raw = vae.decode((z * std + mean)[:, :, None]).sample[:, :, 0].clamp(-1, 1)
    assert dec.shape == (2, 3, 32, 48) and dec.abs().max() <= 1
    torch.testing.assert_close(dec, raw)
    assert anima_encode_latents(vae, img[:1, :, None]).shape == (1, 16, 1, 4, 6)
    with pytest.raises(ValueError, match="divisible by 8"):
        anima_encode_latents(vae, torch.zeros(1, 3, 60, 64))


def test_load_all_models_and_run_end_to_end(tiny) -> None:
    models, paths = tiny
    loaded = load_anima_models(
        paths["dit"], paths["text_encoder"], paths["vae"], paths["t5_tokenizer"], te_dtype=torch.float32
    )
    ctx_a = encode_anima_prompts(loaded, ["a red fox"], max_length=16)
    ctx_b = encode_anima_prompts(models, ["a red fox"], max_length=16)
    assert torch.equal(ctx_a, ctx_b)
    x = torch.randn(1, 16, 1, 8, 8)
    with torch.no_grad():
        v = loaded.dit(x, torch.tensor([0.7]), ctx_a)
    img = anima_decode_latents(loaded.vae, x - 0.7 * v)
    assert img.shape == (1, 3, 1, 64, 64) and torch.isfinite(img).all()


def test_dit_prefix_variants_and_te_extra_tensors(tiny, tmp_path: Path) -> None:
    models, paths = tiny
    sd = load_file(str(paths["dit"]))
    comfy = {"model.diffusion_model." + k[4:]: v for k, v in sd.items()}
    save_file(comfy, str(tmp_path / "comfy_dit.safetensors"))
    _same_state(load_anima_dit(tmp_path / "comfy_dit.safetensors"), models.dit)
    te_sd = load_file(str(paths["text_encoder_file"]))
    te_sd["lm_head.weight"] = te_sd["model.embed_tokens.weight"].clone()
    te_sd["model.some_future_buffer"] = torch.zeros(3)
    save_file(te_sd, str(tmp_path / "te_extra.safetensors"))
    _same_state(
        load_qwen3_text_encoder(tmp_path / "te_extra.safetensors", torch.float32), models.text_encoder
    )
    partial = {k: v for k, v in te_sd.items() if "layers.1.mlp.down_proj" not in k}
    save_file(partial, str(tmp_path / "te_partial.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['layers.1.mlp.down_proj.weight'\]"):
        load_qwen3_text_encoder(tmp_path / "te_partial.safetensors")


def test_qwen3_config_inferred_from_real_shapes(tokenizers_dir: Path) -> None:
    from transformers import Qwen3Config, Qwen3Model

    from library.anima.loading import qwen3_config_from_state_dict

    real = Qwen3Config.from_pretrained(str(tokenizers_dir / "qwen3_06b"))
    with torch.device("meta"):
        sd = Qwen3Model(real).state_dict()
    got = qwen3_config_from_state_dict(sd)
    for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "intermediate_size", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings"):  # fmt: skip
        assert getattr(got, f) == getattr(real, f), f
    assert got.rope_parameters["rope_theta"] == real.rope_parameters["rope_theta"] == 1_000_000


def test_vae_diffusers_folder_loads(tiny, tmp_path: Path) -> None:
    models, _ = tiny
    models.vae.save_pretrained(str(tmp_path / "vae_dir"))
    _same_state(load_anima_vae(tmp_path / "vae_dir"), models.vae)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_anima_vae(tmp_path)


def test_tokenizers_default_to_the_bundled_copies(tiny) -> None:
    """A single-file text encoder has no folder to read a tokenizer from: the bundled ones are used."""
    from library.anima.loading import load_anima_tokenizers

    _, paths = tiny
    q_dir, t5_dir = load_anima_tokenizers(paths["text_encoder"], paths["t5_tokenizer"])
    q_bundled, t5_bundled = load_anima_tokenizers()
    assert q_bundled.get_vocab() == q_dir.get_vocab() and t5_bundled.get_vocab() == t5_dir.get_vocab()
    assert q_bundled.pad_token_id == 151643


def test_dit_file_with_mixed_dtypes_loads_as_one_dtype(tiny, tmp_path: Path) -> None:
    models, paths = tiny
    sd = load_file(str(paths["dit"]))
    mixed = {k: (v if "norm" in k else v.to(torch.bfloat16)) for k, v in sd.items()}  # fp32 norms, bf16 rest
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    dit = load_anima_dit(tmp_path / "mixed.safetensors")
    assert {p.dtype for p in dit.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        out = dit(torch.randn(1, 16, 1, 4, 4), torch.tensor([0.5]), torch.randn(1, 3, 32))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
