"""Load, build and save SDXL: diffusers UNet/VAE + transformers CLIP text encoders.

Single-file SGM checkpoints are written here and read by `library.sdxl.single_file`, both with the key
maps of `library.sdxl.keymap`. The few sizes that no tensor reveals (attention head width, GroupNorm
groups) default to SDXL's values and are written to the file's metadata when they differ (only the
tiny model does that).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from library.io import bundled_tokenizers
from library.io.atomic_io import save_safetensors_atomic
from library.io.bundled_tokenizers import load_bundled
from library.sdxl import config as sdxl_config
from library.sdxl.keymap import (
    DEFAULT_ARCH,
    TE1_PREFIX,
    te2_state_to_openclip,
    unet_state_to_sgm,
    vae_state_to_ldm,
)
from library.sdxl.single_file import ARCH_METADATA_KEY, load_sdxl_single_file, load_vae
from networks.tensor_files import check_weight_folder

logger = logging.getLogger(__name__)
HUB_TOKENIZER_1 = "openai/clip-vit-large-patch14"
HUB_TOKENIZER_2 = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"


@dataclass
class SdxlModels:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder_1: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer_1: Any
    tokenizer_2: Any
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. OpenCLIP logit_scale for re-save

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder_1, self.text_encoder_2]

    @property
    def tokenizers(self) -> list[Any]:
        return [self.tokenizer_1, self.tokenizer_2]


# ------------------------------------------------------------------------------------------ tokenizers


def _fix_tokenizer_2(tok: Any) -> Any:
    # SDXL's second tokenizer pads with "!" (id 0), as the OpenCLIP model was trained
    tok.pad_token = "!"
    if tok.pad_token_id != 0:
        raise ValueError(f"tokenizer 2: '!' should be id 0 in the CLIP vocab, got {tok.pad_token_id}")
    return tok


def _tokenizer_folders(d: Path) -> tuple[Path, Path] | None:
    """(tokenizer 1, tokenizer 2) folders inside d: a CLIP tokenizer folder itself, a diffusers
    folder (tokenizer/, tokenizer_2/), or an sd-scripts --tokenizer_cache_dir (<org>_<name>/)."""
    if (d / "vocab.json").is_file() or (d / "tokenizer.json").is_file():
        return d, d
    if (d / "tokenizer").is_dir():
        return d / "tokenizer", d / "tokenizer_2" if (d / "tokenizer_2").is_dir() else d / "tokenizer"
    c1, c2 = d / HUB_TOKENIZER_1.replace("/", "_"), d / HUB_TOKENIZER_2.replace("/", "_")
    if c1.is_dir():
        return c1, c2 if c2.is_dir() else c1
    return None


def _clip_pair(t1_dir: Path | str, t2_dir: Path | str) -> tuple[Any, Any]:
    t1 = CLIPTokenizer.from_pretrained(str(t1_dir), local_files_only=True)
    return t1, _fix_tokenizer_2(CLIPTokenizer.from_pretrained(str(t2_dir), local_files_only=True))


def load_sdxl_tokenizers(tokenizer_dir: str | Path | None = None) -> tuple[Any, Any]:
    """Both SDXL tokenizers: from a given folder (see _tokenizer_folders), else the package's bundled
    CLIP tokenizer. Never the network or the hub cache. A given folder without tokenizers (an empty
    sd-scripts --tokenizer_cache_dir) falls back to the bundled copy with a warning."""
    if tokenizer_dir is not None:
        d = Path(tokenizer_dir)
        found = _tokenizer_folders(d) if d.is_dir() else None
        if found is not None:
            return _clip_pair(*found)
        logger.warning("no CLIP tokenizer in %s; using the bundled SDXL tokenizer", d)
    return load_bundled(bundled_tokenizers.CLIP, lambda folder: _clip_pair(folder, folder))


# ------------------------------------------------------------------------------------------ building


def _te_config(cfg: dict[str, Any]) -> CLIPTextConfig:
    return CLIPTextConfig(**cfg)


def build_sdxl_from_configs(configs: dict[str, dict[str, Any]], tokenizers: tuple[Any, Any]) -> SdxlModels:
    """Random-initialised models from diffusers/transformers configs (keys as tiny_sdxl_configs)."""
    te1 = CLIPTextModel(_te_config(configs["text_encoder"]))
    te2 = CLIPTextModelWithProjection(_te_config(configs["text_encoder_2"]))
    return SdxlModels(
        unet=UNet2DConditionModel(**configs["unet"]),
        vae=AutoencoderKL(**configs["vae"]),
        text_encoder_1=te1,
        text_encoder_2=te2,
        tokenizer_1=tokenizers[0],
        tokenizer_2=tokenizers[1],
    )


def build_tiny_sdxl_models(tokenizer_dir: str | Path | None = None, seed: int = 0) -> SdxlModels:
    """A tiny random SDXL with the real module tree and key layout (for tests and the demo)."""
    tokenizers = load_sdxl_tokenizers(tokenizer_dir)
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(seed)
        models = build_sdxl_from_configs(sdxl_config.tiny_sdxl_configs(), tokenizers)
    # Random-init GroupNorm/LayerNorm are identity-ish; perturb every tensor a little so that
    # round-trip and key-map tests would notice any swapped tensor.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in (models.unet, models.vae, models.text_encoder_1, models.text_encoder_2):
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    for m in (models.unet, models.vae, models.text_encoder_1, models.text_encoder_2):
        m.eval().requires_grad_(False)
    return models


# ------------------------------------------------------------------------------------------ saving


def _arch_of(models: SdxlModels) -> dict[str, int]:
    uc = models.unet.config
    heads = (
        uc.attention_head_dim
        if isinstance(uc.attention_head_dim, (list, tuple))
        else [uc.attention_head_dim] * 3
    )
    arch = {
        "head_dim": uc.block_out_channels[-1] // heads[-1],
        "te1_head_dim": models.text_encoder_1.config.hidden_size
        // models.text_encoder_1.config.num_attention_heads,
        "te2_head_dim": models.text_encoder_2.config.hidden_size
        // models.text_encoder_2.config.num_attention_heads,
        "unet_groups": uc.norm_num_groups,
        "vae_groups": models.vae.config.norm_num_groups,
        "unet_sample": uc.sample_size,
        "vae_sample": models.vae.config.sample_size,
    }
    return arch


def sdxl_single_file_state(models: SdxlModels) -> dict[str, torch.Tensor]:
    """All four components in the SGM single-file key layout."""
    uc = models.unet.config
    sd = unet_state_to_sgm(models.unet.state_dict(), list(uc.up_block_types), uc.layers_per_block)
    for k, v in hf_text_state(models.text_encoder_1).items():
        sd[TE1_PREFIX + k] = v
    n_pos = models.text_encoder_1.config.max_position_embeddings
    sd[TE1_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(n_pos, dtype=torch.int64)[None]
    logit_scale = models.extra.get("logit_scale", torch.tensor(4.6052, dtype=torch.float32))
    sd.update(te2_state_to_openclip(hf_text_state(models.text_encoder_2), logit_scale))
    sd.update(vae_state_to_ldm(models.vae.state_dict(), len(models.vae.config.block_out_channels)))
    return sd


def hf_text_state(te: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with the classic `text_model.` names (transformers 5 dropped that level from
    CLIPTextModel, while checkpoints and LoRA files keep it)."""
    return {
        (k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v
        for k, v in te.state_dict().items()
    }


def save_sdxl_single_file(
    models: SdxlModels,
    path: str | Path,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write the real SGM key layout (`model.diffusion_model.*`, `conditioner.embedders.0/1.*`,
    `first_stage_model.*`) atomically. Non-default head widths/group counts go to metadata."""
    sd = sdxl_single_file_state(models)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    meta = dict(metadata or {})
    arch = _arch_of(models)
    defaults = {**DEFAULT_ARCH, "te1_head_dim": 64, "te2_head_dim": 64}
    if any(arch[k] != defaults[k] for k in arch):
        meta[ARCH_METADATA_KEY] = json.dumps(arch, sort_keys=True)
    save_safetensors_atomic(sd, path, meta)


def save_sdxl_diffusers(models: SdxlModels, folder: str | Path) -> None:
    """Write a diffusers-style SDXL folder (unet/, vae/, text_encoder*/, tokenizer*/); atomic rename."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", suffix=".tmp", dir=str(folder.parent)))
    try:
        models.unet.save_pretrained(tmp / "unet")
        models.vae.save_pretrained(tmp / "vae")
        models.text_encoder_1.save_pretrained(tmp / "text_encoder")
        models.text_encoder_2.save_pretrained(tmp / "text_encoder_2")
        models.tokenizer_1.save_pretrained(tmp / "tokenizer")
        models.tokenizer_2.save_pretrained(tmp / "tokenizer_2")
        (tmp / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------ loading


def _resolve_folder(name: str) -> Path:
    p = Path(name)
    if p.is_dir():
        return p
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not p.exists():
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(name, local_files_only=True))
        except Exception as e:  # the hub raises several types for "not cached"
            raise FileNotFoundError(
                f"model {name!r} is neither a local file/folder nor in the local Hugging Face cache (no downloads)"
            ) from e
    raise FileNotFoundError(
        f"model {name!r} does not exist (expected an SDXL .safetensors file or diffusers folder)"
    )


def load_sdxl_models(
    pretrained_model_name_or_path: str | Path,
    vae: str | Path | None = None,
    tokenizer_dir: str | Path | None = None,
    dtype: torch.dtype | None = torch.float32,
) -> SdxlModels:
    """SDXL from a single-file SGM checkpoint, a diffusers folder, or a cached hub id (offline). `dtype`
    None keeps a single file's stored dtypes; a diffusers folder then loads as from_pretrained does."""
    name = str(pretrained_model_name_or_path)
    if Path(name).is_file():
        parts = load_sdxl_single_file(name, dtype)
        toks = load_sdxl_tokenizers(tokenizer_dir)
    else:
        folder = _resolve_folder(name)
        need = ["unet", "vae", "text_encoder", "text_encoder_2"]
        absent = [d for d in need if not (folder / d).is_dir()]
        if absent:
            raise ValueError(
                f"{folder} is not a diffusers SDXL folder: missing {', '.join(absent)} (expected {', '.join(need)})"
            )
        for d in need:  # a cut or foreign weight file is named here, not deep inside from_pretrained
            check_weight_folder(folder / d, "model file")
        kw = {"torch_dtype": dtype, "local_files_only": True}
        parts = {
            "unet": UNet2DConditionModel.from_pretrained(str(folder / "unet"), **kw),
            "vae": AutoencoderKL.from_pretrained(str(folder / "vae"), **kw),
            "text_encoder_1": CLIPTextModel.from_pretrained(str(folder / "text_encoder"), **kw),
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(
                str(folder / "text_encoder_2"), **kw
            ),
            "extra": {},
        }
        if tokenizer_dir is None and (folder / "tokenizer").is_dir():
            t2_dir = folder / "tokenizer_2" if (folder / "tokenizer_2").is_dir() else folder / "tokenizer"
            toks = _clip_pair(folder / "tokenizer", t2_dir)
        else:
            toks = load_sdxl_tokenizers(tokenizer_dir)
    if vae is not None:
        parts["vae"] = load_vae(vae, dtype)
    for k in ("unet", "vae", "text_encoder_1", "text_encoder_2"):
        parts[k].eval().requires_grad_(False)
    return SdxlModels(tokenizer_1=toks[0], tokenizer_2=toks[1], **parts)


# ------------------------------------------------------------------------------ network modules
# Packages whose network modules name layers from sd-scripts' own SDXL U-Net classes (SGM layout). On
# diffusers' UNet2DConditionModel, used here, LyCORIS 4.1.3 stops on a duplicated name; any names it did
# produce would be diffusers paths that sd-scripts and ComfyUI cannot load.
SGM_ONLY_NETWORK_PACKAGES = ("lycoris",)


def is_sgm_only_network_module(name: str) -> bool:
    """True for a `--network_module` that cannot target this project's diffusers SDXL U-Net."""
    return name.split(".")[0] in SGM_ONLY_NETWORK_PACKAGES


def check_sdxl_network_module(name: str) -> None:
    """Refuse, with the replacement, a network module that cannot target the diffusers SDXL U-Net."""
    if is_sgm_only_network_module(name):
        raise ValueError(
            f"--network_module {name}: LyCORIS names modules from sd-scripts' own SDXL U-Net classes and "
            "cannot target the diffusers U-Net used here; use networks.loha, networks.lokr or networks.lora "
            "(they write the same LyCORIS-compatible files, and read LyCORIS files)"
        )
