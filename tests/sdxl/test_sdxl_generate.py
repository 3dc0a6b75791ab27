"""Samplers and SDXL generation with the tiny model: sizes, determinism, seeds, patched modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from library.inference.samplers import TRAIN_SAMPLE_CHOICES, make_scheduler, sampler_names
from library.sdxl.generate import generate_sdxl
from library.sdxl.loading import SdxlModels, build_tiny_sdxl_models


def _px(img) -> np.ndarray:
    return np.asarray(img).astype(np.int16)


def test_every_sampler_name_builds_with_sdxl_betas() -> None:
    assert set(TRAIN_SAMPLE_CHOICES) <= set(sampler_names())
    for name in sampler_names():
        s = make_scheduler(name)
        assert s.config.beta_schedule == "scaled_linear", name
        assert s.config.beta_start == 0.00085 and s.config.beta_end == 0.012, name
        s.set_timesteps(4)
        assert len(s.timesteps) >= 4, name
    assert type(make_scheduler("k_euler_a")).__name__ == "EulerAncestralDiscreteScheduler"
    assert type(make_scheduler("DDIM")).__name__ == "DDIMScheduler"
    assert make_scheduler("ddim").config.clip_sample is True  # as sd-scripts' sample scheduler
    assert make_scheduler("dpmsolver++_sde").config.algorithm_type == "sde-dpmsolver++"
    assert make_scheduler("euler", v_parameterization=True).config.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match=r"unknown sampler 'foo'; valid names: ddim, pndm, .*k_euler_a"):
        make_scheduler("foo")


@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "dpmsolver++", "dpm_2_a", "lms"])
def test_generation_size_finite_deterministic(tiny: SdxlModels, sampler: str) -> None:
    kw = dict(width=64, height=32, steps=3, guidance_scale=5.0, sampler=sampler)
    a = generate_sdxl(tiny, ["a photo of a cat"], seeds=[11], **kw)
    b = generate_sdxl(tiny, ["a photo of a cat"], seeds=[11], **kw)
    c = generate_sdxl(tiny, ["a photo of a cat"], seeds=[12], **kw)
    assert a[0].size == (64, 32) and a[0].mode == "RGB"
    assert np.array_equal(_px(a[0]), _px(b[0]))
    assert np.abs(_px(a[0]) - _px(c[0])).max() > 10
    lat = generate_sdxl(tiny, ["a photo of a cat"], seeds=[11], output_type="latent", **kw)
    assert lat.shape == (1, 4, 4, 8) and torch.isfinite(lat).all()


def test_seed_independent_of_batch_position(tiny: SdxlModels) -> None:
    kw = dict(width=32, height=32, steps=3, guidance_scale=5.0, sampler="euler_a")
    batch = generate_sdxl(tiny, ["a cat", "a dog"], ["", "blurry"], seeds=[5, 6], **kw)
    alone = generate_sdxl(tiny, ["a dog"], ["blurry"], seeds=[6], **kw)
    assert np.abs(_px(batch[1]) - _px(alone[0])).max() <= 2  # batched matmul rounding only
    assert np.abs(_px(batch[0]) - _px(batch[1])).max() > 10


def test_prompt_weights_change_the_image(tiny: SdxlModels) -> None:
    kw = dict(width=32, height=32, steps=2, guidance_scale=5.0, sampler="ddim", seeds=[3])
    plain = _px(generate_sdxl(tiny, ["a cat"], **kw)[0])
    same = _px(generate_sdxl(tiny, ["a cat"], emb_normalize_mode="original", **kw)[0])
    weighted = _px(generate_sdxl(tiny, ["a (cat:1.8)"], emb_normalize_mode="none", **kw)[0])
    assert np.array_equal(plain, same)
    assert np.abs(weighted - plain).max() > 0


def test_patched_module_forward_is_used(tiny: SdxlModels) -> None:
    """A network applied by patching a Linear's forward (as LoRA modules do) changes the image."""
    kw = dict(width=32, height=32, steps=2, guidance_scale=1.0, sampler="ddim", seeds=[3])
    base = _px(generate_sdxl(tiny, ["a cat"], **kw)[0])
    lin = tiny.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_v
    org = lin.forward
    lin.forward = lambda x: org(x) + 0.5  # type: ignore[method-assign]
    try:
        patched = _px(generate_sdxl(tiny, ["a cat"], **kw)[0])
    finally:
        lin.forward = org  # type: ignore[method-assign]
    again = _px(generate_sdxl(tiny, ["a cat"], **kw)[0])
    assert np.abs(patched - base).max() > 0
    assert np.array_equal(again, base)


def test_generation_bad_input(tiny: SdxlModels) -> None:
    with pytest.raises(ValueError, match="multiples of 32"):
        generate_sdxl(tiny, ["x"], width=40, height=32, steps=1)
    with pytest.raises(ValueError, match="same length"):
        generate_sdxl(tiny, ["x", "y"], seeds=[1], width=32, height=32, steps=1)
    with pytest.raises(ValueError, match="unknown sampler"):
        generate_sdxl(tiny, ["x"], width=32, height=32, steps=1, sampler="nope")
    with pytest.raises(ValueError, match="pndm needs steps >= 4"):
        generate_sdxl(tiny, ["x"], width=32, height=32, steps=3, sampler="pndm")


def test_bf16_unet_with_fp32_vae(clip_tokenizer_dir: Path, tiny: SdxlModels) -> None:
    """--no_half_vae style: bf16 UNet/TEs, fp32 VAE; and fp32 weights asked for bf16 (autocast)."""
    kw = dict(width=32, height=32, steps=2, guidance_scale=3.0, sampler="euler", seeds=[4])
    ref = _px(generate_sdxl(tiny, ["a cat"], **kw)[0])
    half = build_tiny_sdxl_models(clip_tokenizer_dir, seed=0)
    for m in (half.unet, half.text_encoder_1, half.text_encoder_2):
        m.to(torch.bfloat16)
    img = _px(generate_sdxl(half, ["a cat"], dtype=torch.bfloat16, **kw)[0])
    assert img.shape == ref.shape and np.abs(img - ref).mean() < 8  # bf16 noise only
    auto = _px(generate_sdxl(tiny, ["a cat"], dtype=torch.bfloat16, **kw)[0])
    assert np.abs(auto - ref).mean() < 8
    assert next(tiny.unet.parameters()).dtype == torch.float32


def test_every_sampler_generates(tiny: SdxlModels) -> None:
    """Each canonical sampler runs end to end (catches step-time failures, not just construction)."""
    from library.inference.samplers import SAMPLERS

    for name in SAMPLERS:
        lat = generate_sdxl(
            tiny, ["a cat"], width=32, height=32, steps=4, guidance_scale=4.0, sampler=name, seeds=[1],
            output_type="latent",
        )  # fmt: skip
        assert lat.shape == (1, 4, 4, 4) and torch.isfinite(lat).all(), name
