"""Read SGM single-file SDXL checkpoints into diffusers/transformers modules, one tensor at a time.

Architecture sizes (channels, depths, vocab, ...) are inferred from the tensor shapes in the file's
header, so the real model and the tiny test model go through the same code; the few sizes no tensor
reveals come from the file's metadata (see `library.sdxl.loading`). Each module is built on the meta
device and checked against the file's names and shapes before any tensor is read; the tensors are then
read one by one (not mapped), converted and cast on the way, and assigned to the module, so loading
holds one copy of the weights, in the requested dtype.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from library.sdxl import config as sdxl_config
from library.sdxl.keymap import (
    DEFAULT_ARCH,
    TE1_PREFIX,
    TE2_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    infer_te_config,
    infer_unet_config,
    infer_vae_config,
    openclip_to_te2_state,
    unet_state_to_sgm,
    vae_state_to_ldm,
)
from networks.fp8 import is_fp8
from networks.tensor_stream import TensorStream

ARCH_METADATA_KEY = "sdxl_arch"  # JSON of the sizes that tensors cannot reveal
SDXL_DETECT_KEY = TE2_PREFIX + "transformer.resblocks.0.attn.in_proj_weight"


def _short_list(keys: list[str], n: int = 20) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


@dataclass
class _Checkpoint:
    """A checkpoint open for reading: every tensor's name and shape as a `meta` stand-in (in file order),
    checked before any data is read, the file's metadata, and how to read one tensor (memory of its own)."""

    stand_ins: dict[str, torch.Tensor]
    metadata: dict[str, str]
    read: Callable[[str], torch.Tensor]
    # a read into one buffer that the next such read reuses, and the test whether a tensor lives there
    read_staged: Callable[[str], torch.Tensor]
    is_staged: Callable[[torch.Tensor], bool]


@contextmanager
def _open_checkpoint(path: Path) -> Iterator[_Checkpoint]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    # a torch.save archive (.ckpt) is read only when its pickle names nothing but tensors
    expected = "an SDXL .safetensors (or tensors-only .ckpt) file"
    with TensorStream([path], "checkpoint", expected=expected) as stream:
        stand_ins = {k: stream.meta(k) for k in stream.keys()}
        yield _Checkpoint(
            stand_ins, stream.metadata, stream.read, lambda k: stream.read(k, staged=True), stream.is_staged
        )


def _describe_prefixes(keys: list[str]) -> str:
    heads = sorted({".".join(k.split(".")[:2]) for k in keys})
    return _short_list(heads, 8)


def check_sdxl_state(sd: dict[str, torch.Tensor], source: str) -> None:
    """Refuse anything that is not an SGM SDXL checkpoint with one clear message."""
    has = {p: any(k.startswith(p) for k in sd) for p in (UNET_PREFIX, TE1_PREFIX, TE2_PREFIX, VAE_PREFIX)}
    if all(has.values()) and SDXL_DETECT_KEY in sd:
        return
    found = "no tensors" if not sd else f"top-level keys {_describe_prefixes(list(sd))}"
    if any(k.startswith("cond_stage_model.") for k in sd):
        kind = "an SD1.x/SD2.x checkpoint (cond_stage_model.*)"
    elif any(k.startswith(("encoder.", "decoder.")) for k in sd) or (
        has[VAE_PREFIX] and not has[UNET_PREFIX]
    ):
        kind = "a VAE only"
    elif any(k.startswith(("lora_", "lycoris_")) for k in sd):
        kind = "a LoRA/LyCORIS network file"
    elif any(k.startswith(("net.llm_adapter.", "llm_adapter.")) for k in sd):
        kind = "an Anima DiT (use anima_train_network.py / anima_minimal_inference.py)"
    else:
        kind = "another kind of model"
    missing = [p + "*" for p, ok in has.items() if not ok]
    raise ValueError(
        f"{source} is not an SDXL single-file checkpoint: it looks like {kind}; found {found}; "
        f"expected model.diffusion_model.*, conditioner.embedders.0.transformer.*, "
        f"conditioner.embedders.1.model.* (OpenCLIP bigG) and first_stage_model.*"
        + (f" (missing: {', '.join(missing)})" if missing else "")
    )


def _strip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


@dataclass
class _Part:
    """One component's tensors: names without the component prefix, with shape-only stand-ins (or the
    tensors themselves) for the checks, and how to read one tensor."""

    stand_ins: dict[str, torch.Tensor]
    read: Callable[[str], torch.Tensor]
    read_staged: Callable[[str], torch.Tensor]  # see _Checkpoint
    is_staged: Callable[[torch.Tensor], bool]

    @classmethod
    def of(cls, src: _Checkpoint, prefix: str, skip: tuple[str, ...] = ()) -> _Part:
        stand_ins = {k: v for k, v in _strip(src.stand_ins, prefix).items() if k not in skip}
        return cls(
            stand_ins, lambda k: src.read(prefix + k), lambda k: src.read_staged(prefix + k), src.is_staged
        )

    @classmethod
    def in_memory(cls, sd: dict[str, torch.Tensor]) -> _Part:
        return cls(sd, sd.__getitem__, sd.__getitem__, lambda t: False)


# the module's names for some of a component's tensors (names without the prefix); per tensor, so that
# the names can be checked on stand-ins before reading and the tensors converted one at a time
Convert = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def _check_keys(module: torch.nn.Module, converted: dict[str, torch.Tensor], source: str, what: str) -> None:
    """Every key of the module filled, nothing left over; shapes must match."""
    own = module.state_dict()
    missing = [k for k in own if k not in converted]
    unexpected = [k for k in converted if k not in own]
    if missing or unexpected:
        raise ValueError(
            f"{source}: {what} keys do not match the model"
            + (f"; missing: {_short_list(missing)}" if missing else "")
            + (f"; unexpected: {_short_list(unexpected)}" if unexpected else "")
        )
    bad = [
        f"{k} {tuple(converted[k].shape)}!={tuple(own[k].shape)}"
        for k in own
        if converted[k].shape != own[k].shape
    ]
    if bad:
        raise ValueError(f"{source}: {what} tensor shapes do not match: {_short_list(bad, 10)}")


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None:
        return t.to(dtype)
    return t.float() if is_fp8(t) else t  # fp8 widens exactly; plain modules cannot compute with it


@dataclass
class _Target:
    """A module built on the meta device, the tensors that fill it and how their names map to its own."""

    module: torch.nn.Module
    part: _Part
    convert: Convert
    what: str

    def check(self, source: str) -> None:
        _check_keys(self.module, self.convert(self.part.stand_ins), source, self.what)

    def fill(self, dtype: torch.dtype | None) -> None:
        """Read, convert and cast one tensor at a time: the only full copy made is the module's own
        weights in `dtype` (assigned, not copied again)."""
        loaded: dict[str, torch.Tensor] = {}
        for key in self.part.stand_ins:
            # read into the reused buffer: a fresh buffer per tensor, freed after its cast, would leave
            # holes in the heap that the process keeps resident; what the cast did not copy is copied here
            for name, t in self.convert({key: self.part.read_staged(key)}).items():
                t = _cast(t, dtype)
                loaded[name] = t.clone() if self.part.is_staged(t) else t
        self.module.load_state_dict(loaded, strict=True, assign=True)


def _build(cls: Any, source: str, what: str, *args: Any, **kwargs: Any) -> Any:
    """Instantiate without allocating; a failure means the shapes do not describe an SDXL part."""
    try:
        with init_empty_weights():
            return cls(*args, **kwargs)
    except Exception as e:
        raise ValueError(
            f"{source}: cannot build the SDXL {what} from its tensor shapes ({e}); "
            f"non-standard head widths/GroupNorm groups must be given in the '{ARCH_METADATA_KEY}' metadata"
        ) from e


def _unet_target(part: _Part, cfg: dict[str, Any], source: str) -> _Target:
    what = "UNet (model.diffusion_model.*)"
    unet = _build(UNet2DConditionModel, source, "UNet", **cfg)
    # the forward map of the model's own keys, inverted, tells which SGM tensor fills each key
    own_keys = list(unet.state_dict().keys())
    fwd = unet_state_to_sgm({k: k for k in own_keys}, list(cfg["up_block_types"]), cfg["layers_per_block"])
    names = {sgm_key[len(UNET_PREFIX) :]: diff_key for sgm_key, diff_key in fwd.items()}
    return _Target(unet, part, lambda d: {names.get(k, "<unexpected>." + k): v for k, v in d.items()}, what)


def _vae_target(part: _Part, arch: dict[str, int], source: str) -> _Target:
    cfg = infer_vae_config(part.stand_ins, arch)
    vae = _build(AutoencoderKL, source, "VAE", **cfg)
    own = vae.state_dict()
    fwd = vae_state_to_ldm({k: torch.empty(0) for k in own}, len(cfg["block_out_channels"]), prefix="")
    names = dict(zip(fwd.keys(), own.keys()))

    def convert(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for k, t in tensors.items():
            dk = names.get(k)
            if dk is None:
                out["<unexpected>." + k] = t
            elif t.ndim == 4 and own[dk].ndim == 2:  # LDM's 1x1-conv attention projections
                out[dk] = t[:, :, 0, 0].contiguous()
            else:
                out[dk] = t
        return out

    return _Target(vae, part, convert, "VAE (first_stage_model.*)")


def _vae_from_part(
    part: _Part, source: str, dtype: torch.dtype | None, arch: dict[str, int]
) -> AutoencoderKL:
    target = _vae_target(part, arch, source)
    target.check(source)
    target.fill(dtype)
    return target.module


def vae_from_ldm(
    v: dict[str, torch.Tensor], source: str, dtype: torch.dtype | None, arch: dict[str, int] | None = None
) -> AutoencoderKL:
    """AutoencoderKL from LDM-layout VAE tensors (no prefix)."""
    return _vae_from_part(_Part.in_memory(v), source, dtype, arch or DEFAULT_ARCH)


def _te_target(part: _Part, cfg: dict[str, Any], cls: type, source: str, what: str) -> _Target:
    te = _build(cls, source, what, CLIPTextConfig(**cfg))
    own_flat = not any(k.startswith("text_model.") for k in te.state_dict())
    openclip = cls is CLIPTextModelWithProjection  # SDXL's TE2 is stored in OpenCLIP's layout

    def convert(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        hf = openclip_to_te2_state(tensors)[0] if openclip else tensors
        return {
            (k[len("text_model.") :] if own_flat and k.startswith("text_model.") else k): v
            for k, v in hf.items()
            if k != "text_model.embeddings.position_ids"
        }

    return _Target(te, part, convert, what)


def _arch_from_meta(meta: dict[str, str]) -> dict[str, int]:
    arch = {**DEFAULT_ARCH, "te1_head_dim": 64, "te2_head_dim": 64}
    if ARCH_METADATA_KEY in meta:
        arch.update(json.loads(meta[ARCH_METADATA_KEY]))
    return arch


def _sdxl_targets(src: _Checkpoint, source: str) -> dict[str, _Target]:
    """The four modules on the meta device, each checked against the file's names and shapes."""
    check_sdxl_state(src.stand_ins, source)
    arch = _arch_from_meta(src.metadata)
    te1, te2 = _Part.of(src, TE1_PREFIX), _Part.of(src, TE2_PREFIX, skip=("logit_scale",))
    te2_hf = openclip_to_te2_state(te2.stand_ins)[0]
    te2_cfg = infer_te_config(te2_hf, arch["te2_head_dim"], sdxl_config.SDXL_TE2_CONFIG)
    te1_cfg = infer_te_config(te1.stand_ins, arch["te1_head_dim"], sdxl_config.SDXL_TE1_CONFIG)
    unet = _Part.of(src, UNET_PREFIX)
    unet_cfg = infer_unet_config(unet.stand_ins, arch, te2_cfg["projection_dim"])
    builders = {
        "unet": lambda: _unet_target(unet, unet_cfg, source),
        "vae": lambda: _vae_target(_Part.of(src, VAE_PREFIX), arch, source),
        "text_encoder_1": lambda: _te_target(
            te1, te1_cfg, CLIPTextModel, source, "text encoder 1 (conditioner.embedders.0)"
        ),
        "text_encoder_2": lambda: _te_target(
            te2, te2_cfg, CLIPTextModelWithProjection, source, "text encoder 2 (conditioner.embedders.1)"
        ),
    }
    targets = {}
    for name, build in builders.items():  # built and checked in turn: the first problem is the one named
        targets[name] = build()
        targets[name].check(source)
    return targets


def load_sdxl_single_file(path: str | Path, dtype: torch.dtype | None = torch.float32) -> dict[str, Any]:
    """unet, vae, text_encoder_1, text_encoder_2, extra from an SGM single-file checkpoint. Every name and
    shape is checked before any tensor is read; then tensors are read one at a time, each cast as it comes.
    `dtype` None keeps each tensor's stored dtype (fp8 widened to float32)."""
    path = Path(path)
    with _open_checkpoint(path) as src:
        targets = _sdxl_targets(src, str(path))
        for target in targets.values():
            target.fill(dtype)
        scale_key = TE2_PREFIX + "logit_scale"
        extra = {"logit_scale": src.read(scale_key)} if scale_key in src.stand_ins else {}
    return {**{name: t.module for name, t in targets.items()}, "extra": extra}


def load_vae(path: str | Path, dtype: torch.dtype | None = torch.float32) -> AutoencoderKL:
    """`--vae`: a diffusers folder (or a folder with vae/), or a single file in LDM or diffusers layout."""
    p = Path(path)
    if p.is_dir():
        sub = p / "vae" if (p / "vae" / "config.json").is_file() else p
        if not (sub / "config.json").is_file():
            raise FileNotFoundError(
                f"VAE folder {p} has no config.json (expected a diffusers AutoencoderKL folder)"
            )
        return AutoencoderKL.from_pretrained(str(sub), torch_dtype=dtype, local_files_only=True)
    with _open_checkpoint(p) as src:
        # a whole SDXL checkpoint given as the VAE: only its first_stage_model.* tensors are read
        prefix = VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in src.stand_ins) else ""
        part, arch = _Part.of(src, prefix), _arch_from_meta(src.metadata)
        if "encoder.down.0.block.0.conv1.weight" in part.stand_ins:
            return _vae_from_part(part, str(p), dtype, arch)
        if "encoder.down_blocks.0.resnets.0.conv1.weight" in part.stand_ins:
            # a diffusers-layout file (e.g. diffusion_pytorch_model.safetensors): map it to LDM names first
            sd = {k: part.read(k) for k in part.stand_ins}
            n_levels = len({k.split(".")[2] for k in sd if k.startswith("encoder.down_blocks.")})
            return vae_from_ldm(vae_state_to_ldm(sd, n_levels, prefix=""), str(p), dtype, arch)
        found = _describe_prefixes(list(src.stand_ins))
    raise ValueError(
        f"VAE file {p} is not an SDXL/LDM VAE: expected encoder.down.*/decoder.up.* keys, found {found}"
    )
