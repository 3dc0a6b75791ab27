"""SDXL loading/saving: single-file SGM layout, diffusers folders, OpenCLIP conversion, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors import safe_open
from safetensors.torch import save_file

from library.sdxl.loading import (
    SdxlModels,
    build_tiny_sdxl_models,
    hf_text_state,
    load_sdxl_models,
    load_sdxl_tokenizers,
    load_vae,
    save_sdxl_diffusers,
    sdxl_single_file_state,
)
from library.sdxl.single_file import _open_checkpoint

COMPONENTS = ("unet", "vae", "text_encoder_1", "text_encoder_2")


def _assert_same(a: SdxlModels, b: SdxlModels) -> None:
    for name in COMPONENTS:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k}"


def test_single_file_round_trip_is_exact(tiny: SdxlModels, tiny_file: Path, clip_tokenizer_dir: Path) -> None:
    state = torch.random.get_rng_state()
    again_built = build_tiny_sdxl_models(clip_tokenizer_dir, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # building leaves the global RNG alone
    _assert_same(tiny, again_built)  # and is reproducible for a seed
    loaded = load_sdxl_models(str(tiny_file), tokenizer_dir=clip_tokenizer_dir)
    _assert_same(tiny, loaded)
    assert loaded.unet.config.attention_head_dim == tiny.unet.config.attention_head_dim
    assert loaded.text_encoder_2.config.num_attention_heads == tiny.text_encoder_2.config.num_attention_heads
    assert loaded.tokenizer_2.pad_token_id == 0 and loaded.tokenizer_1.pad_token_id == 49407
    # re-saving the loaded model gives the identical file content
    again = sdxl_single_file_state(loaded)
    first = sdxl_single_file_state(tiny)
    assert again.keys() == first.keys()
    assert all(torch.equal(again[k], first[k]) for k in first)


def test_single_file_uses_real_sgm_layout(tiny_file: Path) -> None:
    with safe_open(str(tiny_file), framework="pt") as f:
        keys = set(f.keys())
    roots = (
        "model.diffusion_model.",
        "conditioner.embedders.0.transformer.text_model.",
        "conditioner.embedders.1.model.",
        "first_stage_model.",
    )
    assert all(k.startswith(roots) for k in keys)
    assert all(any(k.startswith(r) for k in keys) for r in roots)
    for k in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.output_blocks.2.2.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.label_emb.0.0.weight",
        "model.diffusion_model.out.2.weight",
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
        "conditioner.embedders.1.model.text_projection",
        "conditioner.embedders.1.model.ln_final.weight",
        "conditioner.embedders.1.model.logit_scale",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
    ):
        assert k in keys, k


def test_unet_and_vae_maps_agree_with_diffusers_converters(tiny: SdxlModels, tiny_file: Path) -> None:
    """diffusers' own LDM->diffusers converters, fed our file, reproduce our modules' tensors."""
    with safe_open(str(tiny_file), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    unet = convert_ldm_unet_checkpoint(sd, dict(tiny.unet.config))
    own = tiny.unet.state_dict()
    assert unet.keys() == own.keys()
    assert all(torch.equal(unet[k], own[k]) for k in own)
    vae = convert_ldm_vae_checkpoint(sd, dict(tiny.vae.config))
    own = tiny.vae.state_dict()
    assert vae.keys() == own.keys()
    assert all(torch.equal(vae[k].reshape(own[k].shape), own[k]) for k in own)
    te2 = convert_open_clip_checkpoint(tiny.text_encoder_2, sd, prefix="conditioner.embedders.1.model.")
    te2 = {k: v for k, v in te2.items() if v is not None and not k.endswith("position_ids")}
    own = hf_text_state(tiny.text_encoder_2)
    assert te2.keys() == own.keys()
    assert all(torch.equal(te2[k], own[k]) for k in own)


def test_te2_openclip_conversion_is_numerically_right(tiny: SdxlModels, tiny_file: Path) -> None:
    """The HF TE2 equals a direct OpenCLIP-style computation from the file's tensors."""
    with safe_open(str(tiny_file), framework="pt") as f:
        oc = {
            k[len("conditioner.embedders.1.model.") :]: f.get_tensor(k)
            for k in f.keys()
            if k.startswith("conditioner.embedders.1.model.")
        }
    ids = torch.tensor([[49406, 320, 1125, 539, 550, 18376, 49407] + [0] * 70])
    x = oc["token_embedding.weight"][ids] + oc["positional_embedding"][None]
    n_layers = len({k.split(".")[2] for k in oc if k.startswith("transformer.resblocks.")})
    heads = tiny.text_encoder_2.config.num_attention_heads
    mask = torch.full((77, 77), float("-inf")).triu(1)
    ln = torch.nn.functional.layer_norm
    hiddens = [x]
    for i in range(n_layers):
        p = f"transformer.resblocks.{i}."
        w = x.shape[-1]
        h = ln(x, (w,), oc[p + "ln_1.weight"], oc[p + "ln_1.bias"])
        qkv = h @ oc[p + "attn.in_proj_weight"].t() + oc[p + "attn.in_proj_bias"]
        q, k, v = (t.reshape(1, 77, heads, w // heads).transpose(1, 2) for t in qkv.chunk(3, -1))
        att = torch.softmax(q @ k.transpose(-1, -2) / (w // heads) ** 0.5 + mask, -1) @ v
        att = (
            att.transpose(1, 2).reshape(1, 77, w) @ oc[p + "attn.out_proj.weight"].t()
            + oc[p + "attn.out_proj.bias"]
        )
        x = x + att
        h = ln(x, (w,), oc[p + "ln_2.weight"], oc[p + "ln_2.bias"])
        h = torch.nn.functional.gelu(h @ oc[p + "mlp.c_fc.weight"].t() + oc[p + "mlp.c_fc.bias"])
        x = x + h @ oc[p + "mlp.c_proj.weight"].t() + oc[p + "mlp.c_proj.bias"]
        hiddens.append(x)
    final = ln(x, (x.shape[-1],), oc["ln_final.weight"], oc["ln_final.bias"])
    pooled_direct = final[0, 6] @ oc["text_projection"]  # OpenCLIP: x @ P at the EOS token

    loaded = load_sdxl_models(str(tiny_file))
    out = loaded.text_encoder_2(ids, output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[-2], hiddens[-2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.last_hidden_state, final, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.text_embeds[0], pooled_direct, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pooled_direct, final[0, 6] @ oc["text_projection"].t(), atol=1e-3)


def test_diffusers_folder_round_trip(tiny: SdxlModels, tmp_path: Path) -> None:
    save_sdxl_diffusers(tiny, tmp_path / "sdxl")
    loaded = load_sdxl_models(str(tmp_path / "sdxl"))
    _assert_same(tiny, loaded)
    assert loaded.tokenizer_2.pad_token_id == 0
    # the diffusers folder's VAE can be used as --vae, and so can the single file
    vae = load_vae(tmp_path / "sdxl" / "vae")
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), tiny.vae.state_dict().values()))


def test_vae_override_from_single_file(
    tiny: SdxlModels, tiny_file: Path, tmp_path: Path, clip_tokenizer_dir: Path
):
    other = build_tiny_sdxl_models(clip_tokenizer_dir, seed=5)
    vae_sd = {
        k[len("first_stage_model.") :]: v
        for k, v in sdxl_single_file_state(other).items()
        if k.startswith("first_stage_model.")
    }
    save_file(vae_sd, str(tmp_path / "vae.safetensors"), metadata={"sdxl_arch": '{"vae_groups": 8}'})
    loaded = load_sdxl_models(str(tiny_file), vae=str(tmp_path / "vae.safetensors"))
    sa, sb = loaded.vae.state_dict(), other.vae.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sb)
    # the same VAE as a diffusers-layout single file
    save_file(
        other.vae.state_dict(),
        str(tmp_path / "vae_diffusers.safetensors"),
        metadata={"sdxl_arch": '{"vae_groups": 8}'},
    )
    vd = load_vae(tmp_path / "vae_diffusers.safetensors").state_dict()
    assert vd.keys() == sb.keys() and all(torch.equal(vd[k], sb[k]) for k in sb)
    with pytest.raises(ValueError, match=r"not an SDXL/LDM VAE"):
        _save_and_load_vae(tmp_path)
    assert torch.equal(loaded.unet.conv_in.weight, tiny.unet.conv_in.weight)


def test_not_sdxl_checkpoints_are_refused(tiny_file: Path, tmp_path: Path) -> None:
    with safe_open(str(tiny_file), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    vae_only = {k: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    save_file(vae_only, str(tmp_path / "vae_only.safetensors"))
    with pytest.raises(ValueError, match=r"vae_only\.safetensors is not an SDXL.*VAE only"):
        load_sdxl_models(str(tmp_path / "vae_only.safetensors"))
    sd15 = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(1),
    }
    save_file(sd15, str(tmp_path / "sd15.safetensors"))
    with pytest.raises(ValueError, match=r"sd15\.safetensors is not an SDXL.*SD1\.x/SD2\.x"):
        load_sdxl_models(str(tmp_path / "sd15.safetensors"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sdxl_models(str(tmp_path / "missing.safetensors"))


def test_missing_and_unexpected_keys_are_listed(tiny_file: Path, tmp_path: Path) -> None:
    with safe_open(str(tiny_file), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    bad = dict(sd)
    del bad["model.diffusion_model.out.0.weight"]
    bad["model.diffusion_model.extra_thing.weight"] = torch.zeros(1)
    save_file(bad, str(tmp_path / "bad.safetensors"), metadata={"sdxl_arch": _arch_meta(tiny_file)})
    with pytest.raises(
        ValueError, match=r"missing: .*conv_norm_out\.weight.*unexpected: .*extra_thing\.weight"
    ):
        load_sdxl_models(str(tmp_path / "bad.safetensors"))


def _arch_meta(path: Path) -> str:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()["sdxl_arch"]


def test_tokenizers_from_given_folder(clip_tokenizer_dir: Path, tmp_path: Path) -> None:
    t1, t2 = load_sdxl_tokenizers(clip_tokenizer_dir)
    ids1 = t1("a photo of an astronaut", padding="max_length", max_length=77).input_ids
    ids2 = t2("a photo of an astronaut", padding="max_length", max_length=77).input_ids
    assert ids1[:8] == [49406, 320, 1125, 539, 550, 18376, 49407, 49407]
    assert ids2[:8] == [49406, 320, 1125, 539, 550, 18376, 49407, 0]
    # an sd-scripts --tokenizer_cache_dir layout, and an empty cache dir (falls back to the bundled one)
    cache = tmp_path / "cache"
    t1.save_pretrained(cache / "openai_clip-vit-large-patch14")
    c1, c2 = load_sdxl_tokenizers(cache)
    assert c1("a cat").input_ids == t1("a cat").input_ids and c2.pad_token_id == 0
    for empty in (tmp_path / "nope", tmp_path):
        e1, e2 = load_sdxl_tokenizers(empty)
        assert e1.get_vocab() == t1.get_vocab() and e2.pad_token_id == 0


def test_real_size_layout_on_meta_device() -> None:
    """The real SDXL sizes: 2515 tensors in the four SGM groups, and sizes inferred back from shapes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library.sdxl import config as c
    from library.sdxl.keymap import (
        DEFAULT_ARCH,
        infer_te_config,
        infer_unet_config,
        infer_vae_config,
        openclip_to_te2_state,
    )

    with torch.device("meta"):
        real = SdxlModels(
            UNet2DConditionModel(**c.SDXL_UNET_CONFIG),
            AutoencoderKL(**c.SDXL_VAE_CONFIG),
            CLIPTextModel(CLIPTextConfig(**c.SDXL_TE1_CONFIG)),
            CLIPTextModelWithProjection(CLIPTextConfig(**c.SDXL_TE2_CONFIG)),
            None,
            None,
        )
    sd = sdxl_single_file_state(real)
    groups = {
        p: sum(k.startswith(p) for k in sd)
        for p in (
            "model.diffusion_model.",
            "conditioner.embedders.0.transformer.",
            "conditioner.embedders.1.model.",
            "first_stage_model.",
        )
    }
    assert len(sd) == 2515  # the tensor count of sd_xl_base_1.0.safetensors
    assert list(groups.values()) == [1680, 197, 390, 248]
    assert sd["model.diffusion_model.label_emb.0.0.weight"].shape == (1280, 2816)
    assert sd["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"].shape == (
        3840,
        1280,
    )

    def strip(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}

    assert infer_unet_config(strip("model.diffusion_model."), DEFAULT_ARCH, 1280) == c.SDXL_UNET_CONFIG
    assert infer_vae_config(strip("first_stage_model."), DEFAULT_ARCH) == c.SDXL_VAE_CONFIG
    te2, _ = openclip_to_te2_state(strip("conditioner.embedders.1.model."))
    assert infer_te_config(te2, 64, c.SDXL_TE2_CONFIG) == c.SDXL_TE2_CONFIG
    te1 = strip("conditioner.embedders.0.transformer.")
    assert infer_te_config(te1, 64, c.SDXL_TE1_CONFIG) == c.SDXL_TE1_CONFIG


def test_hub_id_loads_from_local_cache_only(tiny: SdxlModels, tmp_path: Path, monkeypatch) -> None:
    """A hub id resolves through the local Hugging Face cache; an uncached id is a clear error."""
    repo = tmp_path / "hub" / "models--someone--tiny-sdxl"
    save_sdxl_diffusers(tiny, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_sdxl_models("someone/tiny-sdxl")
    _assert_same(tiny, loaded)
    with pytest.raises(FileNotFoundError, match="nor in the local Hugging Face cache"):
        load_sdxl_models("someone/not-cached")


def test_load_in_bf16_and_convert_file_to_folder(tiny_file: Path, tmp_path: Path, tiny: SdxlModels) -> None:
    half = load_sdxl_models(str(tiny_file), dtype=torch.bfloat16)
    for name in COMPONENTS:
        assert {p.dtype for p in getattr(half, name).parameters()} == {torch.bfloat16}, name
    torch.testing.assert_close(half.unet.conv_in.weight, tiny.unet.conv_in.weight.to(torch.bfloat16))
    # a single file converts to a diffusers folder and back without change
    full = load_sdxl_models(str(tiny_file))
    save_sdxl_diffusers(full, tmp_path / "converted")
    _assert_same(tiny, load_sdxl_models(str(tmp_path / "converted")))
    # .ckpt (torch.save) files are read with weights_only; without the tiny model's arch metadata
    # (head width, groups) the real SDXL values are assumed, which cannot build the tiny shapes
    with safe_open(str(tiny_file), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    torch.save({"state_dict": sd}, tmp_path / "tiny.ckpt")
    with _open_checkpoint(tmp_path / "tiny.ckpt") as src:
        read, meta = {k: src.read(k) for k in src.stand_ins}, src.metadata
    assert read.keys() == sd.keys() and all(torch.equal(read[k], sd[k]) for k in sd) and meta == {}
    with pytest.raises(ValueError, match=r"tiny\.ckpt: cannot build the SDXL VAE from its tensor shapes"):
        load_sdxl_models(str(tmp_path / "tiny.ckpt"))


def _save_and_load_vae(tmp_path: Path) -> None:
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "foo.safetensors"))
    load_vae(tmp_path / "foo.safetensors")
