"""Offline loaders for the released Anima files, plus tiny builders/writers that produce the same layouts.

- DiT: one safetensors file, every key prefixed `net.` (LLM adapter inside); config inferred from tensors.
- Text encoder: Qwen3-0.6B from an HF folder or one safetensors file (`model.` prefix stripped).
- VAE: Qwen-Image VAE = diffusers `AutoencoderKLQwenImage`; original Wan key names are renamed.
- Tokenizers: the given folders, else Qwen3's from the text-encoder folder, else the bundled copies.

The weight files are read tensor by tensor into models built on the meta device (library/io/stream_load.py),
each tensor converted as it is read and placed on the device asked for: no second copy on the host.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKLQwenImage
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen3Config, Qwen3ForCausalLM, Qwen3Model

from library.anima.model import (
    OPTIONAL_DIT_BUFFERS,
    Anima,
    AnimaConfig,
    anima_config_from_state_dict,
    tiny_anima_config,
)
from library.io import bundled_tokenizers
from library.io.atomic_io import save_safetensors_atomic
from library.io.bundled_tokenizers import load_bundled
from library.io.stream_load import (
    Device,
    Placement,
    assign,
    build_empty,
    cast_one,
    load_streamed,
    matching,
    settle,
    stream_into,
)
from networks import fp8
from networks.tensor_stream import TensorStream

LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]  # fmt: skip
LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]  # fmt: skip
PathLike = str | os.PathLike
logger = logging.getLogger(__name__)


@dataclass
class AnimaModels:
    dit: Anima | None  # None only while the trainer defers the DiT's load past caching
    text_encoder: Qwen3Model
    vae: AutoencoderKLQwenImage
    qwen_tokenizer: PreTrainedTokenizerBase
    t5_tokenizer: PreTrainedTokenizerBase


# ----------------------------------------------------------------------------------------------- helpers
def _open(path: PathLike, what: str) -> TensorStream:
    p = Path(path)
    if not p.is_file() and not p.is_dir():
        raise FileNotFoundError(f"{what} file not found: {p}")
    # a torch.save archive is read only when its pickle names nothing but tensors
    return TensorStream([p], f"{what} file", expected=f"a {what} .safetensors file")


def _cast(sd: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return {k: cast_one(v, dtype) for k, v in sd.items()}


# ----------------------------------------------------------------------------------------------- DiT
def strip_dit_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the released `net.` prefix (also a ComfyUI `model.diffusion_model.`/`diffusion_model.` one, or none)
    and the recomputed RoPE buffers."""
    prefix = ""
    for cand in ("net.", "model.diffusion_model.", "diffusion_model."):
        if any(k.startswith(cand + "blocks.") for k in sd):
            prefix = cand
            break
    out = {(k[len(prefix) :] if prefix and k.startswith(prefix) else k): v for k, v in sd.items()}
    return {k: v for k, v in out.items() if k not in OPTIONAL_DIT_BUFFERS}


# Linear layers kept in the weight dtype under fp8: embedders, norms, AdaLN modulation, the final layer
# (the same set as musubi-tuner's Anima loader keeps; together a few percent of the weights)
_FP8_KEEP = ("_embedder", "norm", "adaln", "final_layer")


def anima_fp8_layer(name: str) -> bool:
    """Whether the DiT layer `name` (no `net.` prefix) is stored in fp8 under --fp8_base."""
    return not any(part in name for part in _FP8_KEEP)


def _block_placement(num_blocks: int, offload_blocks: int, device: Device) -> Placement:
    """`device` for every tensor except those of the last `offload_blocks` DiT blocks, which stay on the CPU."""
    first = num_blocks - max(0, offload_blocks)
    return lambda key: "cpu" if key.startswith("blocks.") and int(key.split(".")[1]) >= first else device


def _dit_layout(
    stream: TensorStream, path: PathLike
) -> tuple[dict[str, str], dict[str, torch.Tensor], AnimaConfig]:
    """(model key -> file key, model key -> tensor meta, config) from the file's header alone."""
    names = strip_dit_prefix({k: k for k in stream.keys()})
    meta = {k: stream.meta(v) for k, v in names.items()}
    return names, meta, anima_config_from_state_dict(meta, source=f"DiT file {path}")


def read_anima_dit_config(path: PathLike) -> AnimaConfig:
    """The DiT's config from its file's header, no tensor read: a wrong file fails before any work."""
    with _open(path, "Anima DiT") as stream:
        return _dit_layout(stream, path)[2]


def load_anima_dit(
    path: PathLike,
    dtype: torch.dtype | None = None,
    device: Device = "cpu",
    fp8_base: bool = False,
    fp8_scaled: bool = False,
    offload_blocks: int = 0,
) -> Anima:
    """Load the DiT single file; block count and widths come from the tensors.

    Each tensor is read on its own and placed on `device` in `dtype` (the last `offload_blocks` blocks on
    the CPU, for block swap). A file stored in fp8 (plain or scaled, networks/fp8.py) loads too: dequantized
    into `dtype`, or, with `fp8_base`, its fp8 layers kept exactly as stored. `fp8_base` stores the other
    Linear weights that `anima_fp8_layer` names as e4m3 (with a per-output-channel scale if `fp8_scaled`),
    quantized from the file's values (in fp32, so one rounding whatever `dtype` is); `dtype` is the dtype of
    the remaining tensors."""
    with _open(path, "Anima DiT") as stream:
        names, meta, cfg = _dit_layout(stream, path)
        if dtype is None:  # one dtype for the whole model even if the file mixes them (e.g. fp32 norms)
            q = meta["blocks.0.self_attn.q_proj.weight"]
            dtype = torch.bfloat16 if fp8.is_fp8(q) else q.dtype
        scales = {
            layer: stream.read(v) for k, v in names.items() if (layer := fp8.scale_layer(k)) is not None
        }
        model = build_empty(lambda: Anima(cfg))
        weights = {k: v for k, v in names.items() if not fp8.is_storage_key(k)}
        weights = matching(model, weights, f"Anima DiT {path}")
        put = _DitPut(model, stream, scales, dtype, fp8_base or fp8_scaled, fp8_scaled)
        stream_into(model, stream, weights, _block_placement(cfg.num_blocks, offload_blocks, device), put)
    if fp8_base or fp8_scaled:
        logger.info(
            "fp8 base: %d DiT Linear weights stored as float8_e4m3fn%s (%d as found in the file)",
            put.converted,
            " with one scale per output channel" if fp8_scaled else "",
            put.as_stored,
        )
    return model.eval().requires_grad_(False)


class _DitPut:
    """Places one DiT tensor as read: cast to the model dtype, or, for a Linear weight stored in fp8 under
    --fp8_base, as e4m3 (the file's fp8 values and scale when it has them, else quantized from its value)."""

    def __init__(
        self,
        model: Anima,
        stream: TensorStream,
        scales: dict[str, torch.Tensor],
        dtype: torch.dtype,
        to_fp8: bool,
        scaled: bool,
    ) -> None:
        self.model, self.stream, self.scales, self.dtype = model, stream, scales, dtype
        self.to_fp8, self.scaled = to_fp8, scaled
        self.converted = self.as_stored = 0
        # elements of the largest weight that may be quantized: sizes the buffers below once
        self.largest = max(
            (m.weight.numel() for n, m in model.named_modules()
             if to_fp8 and isinstance(m, nn.Linear | nn.Conv2d) and anima_fp8_layer(n)),
            default=0,
        )  # fmt: skip
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def _quantize(self, w: torch.Tensor, device: Device) -> fp8.Packed:
        # one float32 scratch for every layer, and one e4m3 buffer when the result goes to another device
        # (settled from there): the host then allocates only the fp8 weights it keeps
        if self._buffers is None or self._buffers[0].numel() < w.numel():
            self._buffers = None
            n = max(self.largest, w.numel())
            self._buffers = torch.empty(n, dtype=torch.float32), torch.empty(n, dtype=fp8.FP8_DTYPE)
        scratch, out8 = self._buffers
        return fp8.quantize(w, self.scaled, scratch, None if torch.device(device).type == "cpu" else out8)

    def __call__(self, key: str, t: torch.Tensor, device: Device) -> None:
        layer = key[: -len(".weight")] if key.endswith(".weight") else None
        scale = None if layer is None else self.scales.get(layer)
        mod = None if layer is None or not self.to_fp8 else self.model.get_submodule(layer)
        quantize = isinstance(mod, nn.Linear | nn.Conv2d) and anima_fp8_layer(layer or "")
        value, packed = fp8.unpack_fp8_tensor(key, t, scale, torch.float32 if quantize else self.dtype)
        if self.to_fp8 and packed is not None and anima_fp8_layer(layer or ""):
            self.as_stored += 1
        if not quantize:
            assign(self.model, key, settle(self.stream, value, self.dtype, device))
            return
        w8, s = packed if packed is not None else self._quantize(value, device)
        fp8.set_fp8_weight(mod, settle(self.stream, w8, None, device), None if s is None else s.to(device))
        self.converted += 1


def save_anima_dit(
    dit: Anima | dict[str, torch.Tensor], path: PathLike, dtype: torch.dtype | None = None
) -> Path:
    """Save in the released layout: `net.` prefix, metadata format=pt."""
    sd = dit.state_dict() if isinstance(dit, nn.Module) else dit
    sd = _cast({"net." + k: v for k, v in sd.items()}, dtype)
    return save_safetensors_atomic(sd, path, metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------- Qwen3
def qwen3_config_from_state_dict(sd: dict[str, torch.Tensor]) -> Qwen3Config:
    vocab, hidden = sd["embed_tokens.weight"].shape
    head_dim = sd["layers.0.self_attn.q_norm.weight"].shape[0]
    layers = len({int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))})
    return Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, head_dim=head_dim,
        num_attention_heads=sd["layers.0.self_attn.q_proj.weight"].shape[0] // head_dim,
        num_key_value_heads=sd["layers.0.self_attn.k_proj.weight"].shape[0] // head_dim,
        intermediate_size=sd["layers.0.mlp.gate_proj.weight"].shape[0],
        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
        tie_word_embeddings=True, attention_bias=False,
    )  # fmt: skip


def _qwen3_files(d: Path) -> list[Path]:
    files = sorted(d.glob("*.safetensors")) or sorted(d.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"text encoder folder {d} has no *.safetensors weights")
    return files


def load_qwen3_text_encoder(
    path: PathLike | None, dtype: torch.dtype | None = torch.bfloat16, device: Device = "cpu"
) -> Qwen3Model:
    """Qwen3 from an HF folder (config.json + safetensors) or a single safetensors file; frozen, eval."""
    if path is None or str(path) == "":
        raise ValueError(
            "Anima needs the Qwen3 text encoder: pass --qwen3 (training) / --text_encoder (inference)"
        )
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"Qwen3 text encoder not found: {p} (expected a folder or a .safetensors file)"
        )
    files = _qwen3_files(p) if p.is_dir() else [p]
    what = "Qwen3 text encoder"
    with TensorStream(files, f"{what} file", expected=f"a {what} .safetensors file") as stream:
        names = {(k[6:] if k.startswith("model.") else k): k for k in stream.keys()}
        names.pop("lm_head.weight", None)  # tied to embed_tokens; Qwen3Model has no head
        if "embed_tokens.weight" not in names or "layers.0.self_attn.q_norm.weight" not in names:
            raise ValueError(
                f"{p} is not a Qwen3 text encoder checkpoint (no embed_tokens / layers.0.self_attn.q_norm)"
            )
        if p.is_dir() and (p / "config.json").is_file():
            cfg = Qwen3Config.from_pretrained(str(p), local_files_only=True)
        else:
            cfg = qwen3_config_from_state_dict({k: stream.meta(v) for k, v in names.items()})
        cfg._attn_implementation = "sdpa"
        # Non-strict for extra tensors (as the reference loader), strict for missing ones: a partial TE is an error.
        return load_streamed(
            lambda: Qwen3Model(cfg), stream, names, f"{what} {p}", dtype, device, ignore_unexpected=True
        )


# ----------------------------------------------------------------------------------------------- tokenizers
def _has_tokenizer_files(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json"))


def _auto_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def load_anima_tokenizers(
    qwen3_tokenizer_path: PathLike | None = None,
    t5_tokenizer_path: PathLike | None = None,
    text_encoder_path: PathLike | None = None,
) -> tuple[PreTrainedTokenizerBase, PreTrainedTokenizerBase]:
    """(Qwen3 tokenizer, T5 tokenizer), never from the network or the hub cache.

    Qwen3: `--qwen3_tokenizer_path` when given, else the text encoder's own folder when it holds a
    tokenizer, else the bundled copy. T5: `--t5_tokenizer_path` when given, else the bundled copy."""
    if qwen3_tokenizer_path is not None:
        qp = Path(qwen3_tokenizer_path)
        if not _has_tokenizer_files(qp):
            raise FileNotFoundError(
                f"--qwen3_tokenizer_path {qp}: expected a folder holding a Qwen3 tokenizer "
                "(tokenizer.json or vocab.json + merges.txt)"
            )
        qwen = _auto_tokenizer(qp)
    elif text_encoder_path is not None and _has_tokenizer_files(Path(text_encoder_path)):
        qwen = _auto_tokenizer(text_encoder_path)
    else:
        qwen = load_bundled(bundled_tokenizers.QWEN3, _auto_tokenizer)
    if t5_tokenizer_path is not None:
        tp = Path(t5_tokenizer_path)
        folder = tp if tp.is_dir() else tp.parent
        if (
            not tp.exists()
            or not (folder / "tokenizer.json").is_file()
            and not (folder / "spiece.model").is_file()
        ):
            raise FileNotFoundError(
                f"--t5_tokenizer_path {tp}: expected a folder holding a T5 tokenizer (tokenizer.json or spiece.model)"
            )
        t5 = _auto_tokenizer(folder)
    else:
        t5 = load_bundled(bundled_tokenizers.T5, _auto_tokenizer)
    if qwen.pad_token_id is None:
        qwen.pad_token = "<|endoftext|>"
    return qwen, t5


# ----------------------------------------------------------------------------------------------- VAE
_WAN_VAE_RULES: list[tuple[str, str]] = [
    (r"^conv1\.", "quant_conv."),
    (r"^conv2\.", "post_quant_conv."),
    (r"^(encoder|decoder)\.conv1\.", r"\1.conv_in."),
    (r"^(encoder|decoder)\.head\.0\.", r"\1.norm_out."),
    (r"^(encoder|decoder)\.head\.2\.", r"\1.conv_out."),
    (r"\.residual\.0\.", ".norm1."),
    (r"\.residual\.2\.", ".conv1."),
    (r"\.residual\.3\.", ".norm2."),
    (r"\.residual\.6\.", ".conv2."),
    (r"\.shortcut\.", ".conv_shortcut."),
    (r"\.middle\.0\.", ".mid_block.resnets.0."),
    (r"\.middle\.2\.", ".mid_block.resnets.1."),
    (r"\.middle\.1\.", ".mid_block.attentions.0."),
    (r"^encoder\.downsamples\.", "encoder.down_blocks."),
]


def wan_to_diffusers_vae_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename original Wan/Qwen-Image VAE keys to diffusers `AutoencoderKLQwenImage` names."""
    out = {}
    for k, v in sd.items():
        n = k
        for pat, rep in _WAN_VAE_RULES:
            n = re.sub(pat, rep, n)
        m = re.match(r"^decoder\.upsamples\.(\d+)\.(.*)$", n)
        if m:  # 4 entries per up block: 3 resnets then the upsampler (the last block has none)
            i = int(m.group(1))
            sub = f"resnets.{i % 4}" if i % 4 < 3 else "upsamplers.0"
            n = f"decoder.up_blocks.{i // 4}.{sub}.{m.group(2)}"
        out[n] = v
    return out


def diffusers_to_wan_vae_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `wan_to_diffusers_vae_keys` (used to write test files in the released layout)."""
    rules = [
        (r"^quant_conv\.", "conv1."), (r"^post_quant_conv\.", "conv2."),
        (r"^(encoder|decoder)\.conv_in\.", r"\1.conv1."), (r"^(encoder|decoder)\.norm_out\.", r"\1.head.0."),
        (r"^(encoder|decoder)\.conv_out\.", r"\1.head.2."), (r"(\d)\.norm1\.", r"\1.residual.0."),
        (r"(\d)\.conv1\.", r"\1.residual.2."), (r"(\d)\.norm2\.", r"\1.residual.3."),
        (r"(\d)\.conv2\.", r"\1.residual.6."),
        (r"\.conv_shortcut\.", ".shortcut."), (r"\.mid_block\.resnets\.0\.", ".middle.0."),
        (r"\.mid_block\.resnets\.1\.", ".middle.2."), (r"\.mid_block\.attentions\.0\.", ".middle.1."),
        (r"^encoder\.down_blocks\.", "encoder.downsamples."),
    ]  # fmt: skip
    out = {}
    for k, v in sd.items():
        n = k
        m = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)$", n)
        if m:
            idx = int(m.group(1)) * 4 + (int(m.group(3)) if m.group(3) is not None else 3)
            n = f"decoder.upsamples.{idx}.{m.group(4)}"
        for pat, rep in rules:
            n = re.sub(pat, rep, n)
        out[n] = v
    return out


def _vae_from_dims(base_dim: int, z_dim: int) -> AutoencoderKLQwenImage:
    return AutoencoderKLQwenImage(
        base_dim=base_dim,
        z_dim=z_dim,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        latents_mean=LATENTS_MEAN,
        latents_std=LATENTS_STD,
    )


def load_anima_vae(
    path: PathLike, dtype: torch.dtype | None = torch.float32, device: Device = "cpu"
) -> AutoencoderKLQwenImage:
    """Qwen-Image VAE from a single file (Wan or diffusers key names) or a diffusers folder."""
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(
                f"VAE folder {p} has no config.json (expected a diffusers AutoencoderKLQwenImage)"
            )
        vae = AutoencoderKLQwenImage.from_pretrained(str(p), local_files_only=True, torch_dtype=dtype)
        return vae.to(device).eval().requires_grad_(False)
    with _open(p, "Qwen-Image VAE") as stream:
        names = {k: k for k in stream.keys()}  # model key -> file key
        if "conv1.bias" in names:  # the official file keeps the original Wan names
            names = wan_to_diffusers_vae_keys(names)
        if "encoder.conv_in.weight" not in names or "post_quant_conv.weight" not in names:
            raise ValueError(
                f"{p} is not a Qwen-Image/Wan VAE checkpoint (no conv1.bias / encoder.conv_in.weight)"
            )
        base_dim = stream.meta(names["encoder.conv_in.weight"]).shape[0]
        z_dim = stream.meta(names["post_quant_conv.weight"]).shape[0]
        build = lambda: _vae_from_dims(base_dim, z_dim)  # noqa: E731
        return load_streamed(build, stream, names, f"VAE {p}", dtype, device)


def _latent_stats(vae: AutoencoderKLQwenImage, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(vae.config.latents_mean, device=like.device, dtype=torch.float32)
    std = torch.tensor(vae.config.latents_std, device=like.device, dtype=torch.float32)
    shape = (1, -1) + (1,) * (like.ndim - 2)
    return mean.view(shape), std.view(shape)


def anima_encode_latents(vae: AutoencoderKLQwenImage, images: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1,1], (B,3,H,W) or (B,3,T,H,W) -> normalised posterior mean (B,16,h,w) / (B,16,T,h,w)."""
    if images.ndim not in (4, 5) or images.shape[1] != 3:
        raise ValueError(f"images must be (B,3,H,W) or (B,3,T,H,W) in [-1,1]; got {tuple(images.shape)}")
    if images.shape[-1] % 8 or images.shape[-2] % 8:
        raise ValueError(f"image size {tuple(images.shape[-2:])} must be divisible by 8 for the VAE")
    x = images[:, :, None] if images.ndim == 4 else images
    mu = vae.encode(x.to(vae.dtype)).latent_dist.mode().float()
    mean, std = _latent_stats(vae, mu)
    z = (mu - mean) / std
    return z[:, :, 0] if images.ndim == 4 else z


def anima_decode_latents(vae: AutoencoderKLQwenImage, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents (B,16,h,w) or (B,16,T,h,w) -> pixels clamped to [-1,1], same rank as the input."""
    if latents.ndim not in (4, 5):
        raise ValueError(f"latents must be (B,16,h,w) or (B,16,T,h,w); got {tuple(latents.shape)}")
    z = latents[:, :, None] if latents.ndim == 4 else latents
    mean, std = _latent_stats(vae, z)
    img = vae.decode((z.float() * std + mean).to(vae.dtype)).sample.clamp(-1, 1)
    return img[:, :, 0] if latents.ndim == 4 else img


# ----------------------------------------------------------------------------------------------- tiny models
def tiny_qwen3_config(vocab_size: int = 151936) -> Qwen3Config:
    cfg = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        attention_bias=False,
    )
    cfg._attn_implementation = "sdpa"
    return cfg


def build_tiny_anima_models(
    tokenizers_dir: PathLike | None = None, seed: int = 0, dtype: torch.dtype = torch.float32
) -> AnimaModels:
    """Tiny Anima (`tiny_anima_config`): real class names, key layout and tokenizers; random weights."""
    td = None if tokenizers_dir is None else Path(tokenizers_dir)
    torch.manual_seed(seed)
    dit = Anima(tiny_anima_config())
    with torch.no_grad():  # non-trivial norm weights so a wrong norm/weight order shows up in tests
        for name, prm in dit.named_parameters():
            if name.endswith("norm.weight") or "norm_" in name:
                prm.copy_(1.0 + 0.1 * torch.randn_like(prm))
    text_encoder = Qwen3ForCausalLM(tiny_qwen3_config()).model
    vae = _vae_from_dims(8, 16)
    if td is None:
        qwen_tok, t5_tok = load_anima_tokenizers()
    else:
        qwen_tok, t5_tok = load_anima_tokenizers(td / "qwen3_06b", td / "t5_old")
    if dtype != torch.float32:  # diffusers warns on a no-op .to() of the VAE
        dit, text_encoder, vae = dit.to(dtype), text_encoder.to(dtype), vae.to(dtype)
    models = AnimaModels(dit.eval(), text_encoder.eval(), vae.eval(), qwen_tok, t5_tok)
    for m in (models.dit, models.text_encoder, models.vae):
        m.requires_grad_(False)
    return models


def save_tiny_anima_files(models: AnimaModels, out_dir: PathLike) -> dict[str, Path]:
    """Write the models in the released layouts.

    Keys: `dit` (net.-prefixed single file), `text_encoder` (HF folder with config, weights and the Qwen
    tokenizer), `text_encoder_file` (single file, `model.` prefix), `vae` (original Wan key names),
    `vae_diffusers` (diffusers key names), `t5_tokenizer` (folder).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {"dit": save_anima_dit(models.dit, out / "anima_dit_tiny.safetensors")}
    te_sd = {"model." + k: v for k, v in models.text_encoder.state_dict().items()}
    te_dir = out / "qwen3_tiny"
    te_dir.mkdir(exist_ok=True)
    models.text_encoder.config.save_pretrained(str(te_dir))
    save_safetensors_atomic(te_sd, te_dir / "model.safetensors", metadata={"format": "pt"})
    models.qwen_tokenizer.save_pretrained(str(te_dir))
    paths["text_encoder"] = te_dir
    paths["text_encoder_file"] = save_safetensors_atomic(te_sd, out / "qwen3_tiny.safetensors")
    vae_sd = models.vae.state_dict()
    paths["vae"] = save_safetensors_atomic(
        diffusers_to_wan_vae_keys(vae_sd), out / "qwen_image_vae_tiny.safetensors"
    )
    paths["vae_diffusers"] = save_safetensors_atomic(
        vae_sd, out / "qwen_image_vae_tiny_diffusers.safetensors"
    )
    t5_dir = out / "t5_tokenizer"
    if t5_dir.exists():
        shutil.rmtree(t5_dir)
    models.t5_tokenizer.save_pretrained(str(t5_dir))
    paths["t5_tokenizer"] = t5_dir
    return paths


def load_anima_models(
    dit_path: PathLike,
    text_encoder_path: PathLike | None,
    vae_path: PathLike,
    t5_tokenizer_path: PathLike | None = None,
    dit_dtype: torch.dtype | None = None,
    te_dtype: torch.dtype | None = torch.bfloat16,
    vae_dtype: torch.dtype | None = torch.float32,
    device: Device = "cpu",
) -> AnimaModels:
    """All five pieces from released files; tokenizers as load_anima_tokenizers finds them."""
    te = load_qwen3_text_encoder(text_encoder_path, te_dtype, device)
    qwen_tok, t5_tok = load_anima_tokenizers(None, t5_tokenizer_path, text_encoder_path)
    return AnimaModels(
        load_anima_dit(dit_path, dit_dtype, device),
        te,
        load_anima_vae(vae_path, vae_dtype, device),
        qwen_tok,
        t5_tok,
    )
