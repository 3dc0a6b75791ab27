"""Reading SGM single files tensor by tensor: the saved weights in every dtype, every name and shape checked
before any tensor is read, and never more than one tensor read from the file in flight."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from library.sdxl import single_file
from library.sdxl.keymap import TE2_PREFIX, VAE_PREFIX
from library.sdxl.loading import SdxlModels, save_sdxl_single_file
from library.sdxl.single_file import load_sdxl_single_file, load_vae

COMPONENTS = ("unet", "vae", "text_encoder_1", "text_encoder_2")
CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"  # the U-Net's conv_in.weight


def _file_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_are_the_saved_model_cast_once(tiny: SdxlModels, tiny_file: Path, dtype: torch.dtype) -> None:
    parts = load_sdxl_single_file(tiny_file, dtype)
    for name in COMPONENTS:
        got, want = parts[name].state_dict(), getattr(tiny, name).state_dict()
        assert got.keys() == want.keys(), name
        for k, w in want.items():
            assert got[k].dtype == dtype and torch.equal(got[k], w.to(dtype)), f"{name}.{k}"
    assert torch.equal(parts["extra"]["logit_scale"], torch.tensor(4.6052))  # as stored, not cast


def test_stored_dtype_keeps_each_tensor_and_widens_fp8(tiny: SdxlModels, tmp_path: Path) -> None:
    half = tmp_path / "half.safetensors"
    save_sdxl_single_file(tiny, half, dtype=torch.float16)
    sd, meta = _file_tensors(half)
    w8 = tiny.unet.conv_in.weight.to(torch.float8_e4m3fn)
    sd[CONV_IN] = w8
    save_file(sd, str(tmp_path / "mixed.safetensors"), metadata=meta)
    parts = load_sdxl_single_file(tmp_path / "mixed.safetensors", None)
    # fp8 widens to float32 exactly; everything else keeps its stored float16
    assert parts["unet"].conv_in.weight.dtype == torch.float32
    assert torch.equal(parts["unet"].conv_in.weight, w8.float())
    for name in COMPONENTS:
        for k, w in getattr(tiny, name).state_dict().items():
            if not (name == "unet" and k == "conv_in.weight"):
                got = parts[name].state_dict()[k]
                assert got.dtype == torch.float16 and torch.equal(got, w.half()), f"{name}.{k}"
    bf16 = load_sdxl_single_file(tmp_path / "mixed.safetensors", torch.bfloat16)
    assert torch.equal(bf16["unet"].conv_in.weight, w8.to(torch.bfloat16))


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, weakref.ref, int]]:
    """Every tensor the loader reads from a file: (name, weak reference, how many tensors read earlier
    were still alive when it was read)."""
    log: list[tuple[str, weakref.ref, int]] = []
    real_open = single_file._open_checkpoint

    @contextmanager
    def tracked(*args, **kwargs) -> Iterator[single_file._Checkpoint]:
        with real_open(*args, **kwargs) as src:

            def logged(reader):
                def read(name: str) -> torch.Tensor:
                    alive = sum(ref() is not None for _, ref, _ in log)
                    t = reader(name)
                    log.append((name, weakref.ref(t), alive))
                    return t

                return read

            yield single_file._Checkpoint(
                src.stand_ins, src.metadata, logged(src.read), logged(src.read_staged), src.is_staged
            )

    monkeypatch.setattr(single_file, "_open_checkpoint", tracked)
    return log


def test_one_tensor_in_flight_when_casting(tiny_file: Path, reads: list) -> None:
    parts = load_sdxl_single_file(tiny_file, torch.bfloat16)
    names, _ = _file_tensors(tiny_file)
    assert sorted(n for n, _, _ in reads) == sorted(names)  # each tensor read once
    # a loader that held the file's tensors (a state dict) would have hundreds alive here; this one keeps
    # at most the previous tensor while reading the next (a view would keep its base tensor alive too)
    assert max(alive for _, _, alive in reads) <= 1
    # once loaded, the module weights are the bf16 casts: nothing read stays alive but the logit scale
    assert [n for n, ref, _ in reads if ref() is not None] == [TE2_PREFIX + "logit_scale"]
    assert parts["unet"].conv_in.weight.dtype == torch.bfloat16


def test_names_and_shapes_are_checked_before_reading(tiny_file: Path, tmp_path: Path, reads: list) -> None:
    sd, meta = _file_tensors(tiny_file)
    sd[TE2_PREFIX + "ln_final.weight"] = torch.zeros(3)  # text encoder 2 is the last module checked
    save_file(sd, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(
        ValueError, match=r"text encoder 2 .* shapes do not match: .*final_layer_norm\.weight"
    ):
        load_sdxl_single_file(tmp_path / "bad.safetensors")
    assert reads == []


def test_vae_from_a_whole_checkpoint_reads_only_the_vae(
    tiny: SdxlModels, tiny_file: Path, reads: list
) -> None:
    vae = load_vae(tiny_file)
    names, _ = _file_tensors(tiny_file)
    assert sorted(n for n, _, _ in reads) == sorted(k for k in names if k.startswith(VAE_PREFIX))
    want = tiny.vae.state_dict()
    assert all(torch.equal(vae.state_dict()[k], w) for k, w in want.items())


@pytest.mark.parametrize("scaled", [False, True])
def test_fp8_from_stored_weights_equals_fp8_from_fp32(tiny: SdxlModels, tmp_path: Path, scaled: bool) -> None:
    """gen_img's --fp8_base/--fp8_scaled quantize the weights as stored (no fp32 copy of the model): the
    same fp8 values and scales as quantizing a float32 load, since quantize widens to float32 itself."""
    from networks.fp8 import apply_fp8_base

    path = tmp_path / "half.safetensors"
    save_sdxl_single_file(tiny, path, dtype=torch.float16)
    stored, wide = (
        load_sdxl_single_file(path, None)["unet"],
        load_sdxl_single_file(path, torch.float32)["unet"],
    )
    assert stored.conv_in.weight.dtype == torch.float16
    assert apply_fp8_base(stored, scaled) == apply_fp8_base(wide, scaled) > 0
    got, want = stored.state_dict(), wide.state_dict()
    fp8 = [k for k, v in want.items() if v.dtype == torch.float8_e4m3fn]
    assert fp8 and all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in fp8)
    scales = [k for k in want if k.endswith("scale_weight")]
    assert len(scales) == (len(fp8) if scaled else 0)
    assert all(torch.equal(got[k], want[k]) for k in scales)


@pytest.mark.parametrize(
    "fp8,scaled,base_weights",
    [(True, False, None), (True, True, None), (False, False, None), (False, False, ["n"])],
)
def test_trainer_load_equals_a_float32_load_cast_after(
    tiny: SdxlModels,
    tmp_path: Path,
    clip_tokenizer_dir: Path,
    fp8: bool,
    scaled: bool,
    base_weights: list | None,
) -> None:
    """The trainer loads the stored dtypes and then quantizes (--fp8_base) or casts the U-Net to the weight
    dtype; every tensor of the four models has the dtype and value that a float32 load gets when quantized,
    or when cast by prepare_models, afterwards. With --base_weights the U-Net stays float32 for the merge."""
    from types import SimpleNamespace

    from library.sdxl.loading import load_sdxl_models
    from library.sdxl.trainer import SdxlArchitecture
    from networks.fp8 import apply_fp8_base

    path = tmp_path / "half.safetensors"
    save_sdxl_single_file(tiny, path, dtype=torch.float16)
    args = SimpleNamespace(pretrained_model_name_or_path=str(path), vae=None, fp8_base=fp8, fp8_scaled=scaled,
                           no_half_vae=False, base_weights=base_weights,
                           tokenizer_cache_dir=str(clip_tokenizer_dir))  # fmt: skip
    arch = SdxlArchitecture()
    arch.load_models(SimpleNamespace(args=args, weight_dtype=torch.bfloat16))
    want = load_sdxl_models(path, tokenizer_dir=clip_tokenizer_dir, dtype=torch.float32)
    if fp8:
        for m in (want.unet, want.text_encoder_1, want.text_encoder_2):
            apply_fp8_base(m, scaled)
    elif not base_weights:
        want.unet.to(torch.bfloat16)
    n_fp8 = 0
    for name in COMPONENTS:
        got, ref = getattr(arch.models, name).state_dict(), getattr(want, name).state_dict()
        assert got.keys() == ref.keys(), name
        for k, w in ref.items():
            assert got[k].dtype == w.dtype and torch.equal(got[k], w), f"{name}.{k}"
            n_fp8 += w.dtype == torch.float8_e4m3fn
    assert (n_fp8 > 0) == fp8
    bias = arch.models.unet.conv_in.bias.dtype
    assert bias == (torch.bfloat16 if not (fp8 or base_weights) else torch.float32)
