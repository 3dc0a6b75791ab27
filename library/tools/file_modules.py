"""Network files without a model: the reference module trees of SDXL and Anima, and adapter modules rebuilt
from a file's tensors alone (for inspecting, resizing and merging files).

The references are the real model classes at their released sizes, built on the meta device (no memory,
well under a second), so module names, layer kinds and default targets come from the project's own
targeting code (`networks.network_base`), never from a second list of names.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from networks.modules.adapter import AdapterModule
from networks.network_args import NetworkArgs
from networks.network_io import detect_algorithm, group_by_module

# Qwen3-0.6B, Anima's text encoder (the released config's sizes)
QWEN3_06B = {
    "vocab_size": 151936,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
}


class FileError(ValueError):
    """A network file that cannot be read as one (the message names the file or key)."""


def read_network_file(
    path: str, what: str = "network file"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a .safetensors file (or a weights-only `torch.save` dict). Unreadable,
    pickled, truncated or foreign files are named by the shared reader (networks/tensor_files.py)."""
    from pathlib import Path

    from networks.network_io import read_weights

    p = Path(path)
    if not p.is_file():
        raise FileError(f"{what} {path!r} does not exist (expected a .safetensors file)")
    sd, meta = read_weights(p, f"{what} {path!r}")
    if not sd:
        raise FileError(f"{what} {path!r} holds no tensors")
    return sd, meta


def anima_lycoris_aliases(ref: Reference) -> None:
    """LyCORIS names Anima's one Qwen3 encoder `lora_te1_…`: read those names as `lora_te_…`."""
    for name in list(ref.leaves):
        if name.startswith("lora_te_"):
            ref.aliases.setdefault("lora_te1_" + name[len("lora_te_") :], name)


@dataclass
class Reference:
    """One architecture's adaptable layers, by file module name."""

    arch: str  # "sdxl" | "anima"
    leaves: dict[str, nn.Module]  # lora_name -> the (meta) Linear/Conv2d layer
    components: dict[str, str]  # lora_name -> component label
    defaults: dict[str, set[str]]  # component label -> lora_names of its default targets
    aliases: dict[str, str] = field(default_factory=dict)  # model-path (diffusers) name -> lora_name

    def component_of(self, lora_name: str) -> str | None:
        return self.components.get(lora_name)


def _collect(arch_name: str, tes: list[nn.Module], unet: nn.Module) -> Reference:
    """Every Linear/Conv2d a file may name (with its component), and the default targets of a LoRA network
    created by the project's own code (plus, for Anima, the LLM adapter it adds on request)."""
    from networks import lora
    from networks.arch import detect_architecture
    from networks.network_base import iter_all_leaves, lora_name_of, model_roots

    arch = detect_architecture(tes, unet)
    ref = Reference(arch_name, {}, {}, {})
    for root in model_roots(arch, tes, unet, None):
        for original, path, leaf in iter_all_leaves(root):
            name = lora_name_of(root.prefix, original)
            ref.leaves.setdefault(name, leaf)
            ref.components.setdefault(name, component_label(arch_name, name))
            ref.aliases.setdefault(lora_name_of(root.prefix, path), name)
    nets = [lora.create_network(1.0, 1, 1, None, tes, unet)]
    if arch_name == "anima":
        nets.append(lora.create_network(1.0, 1, 1, None, tes, unet, train_llm_adapter=True))
    for net in nets:
        for m in net.all_loras:
            ref.defaults.setdefault(component_label(arch_name, m.lora_name), set()).add(m.lora_name)
    return ref


# file-name prefix -> the model part it adapts (first match wins)
_PARTS = {
    "sdxl": (("lora_te1_", "CLIP-L (TE1)"), ("lora_te2_", "OpenCLIP bigG (TE2)"), ("", "SDXL U-Net")),
    "anima": (
        ("lora_te_", "Qwen3 text encoder"),
        ("lora_unet_llm_adapter_", "LLM adapter"),
        ("", "Anima DiT"),
    ),
}


def component_label(arch: str, name: str) -> str:
    return next(label for prefix, label in _PARTS[arch] if name.startswith(prefix))


def sdxl_reference(unet: nn.Module, te1: nn.Module | None, te2: nn.Module | None) -> Reference:
    return _collect("sdxl", [te1, te2], unet)  # type: ignore[list-item]


def anima_reference(dit: nn.Module, qwen3: nn.Module | None) -> Reference:
    ref = _collect("anima", [qwen3] if qwen3 is not None else [], dit)
    anima_lycoris_aliases(ref)
    return ref


@functools.lru_cache(maxsize=1)
def real_references() -> tuple[Reference, ...]:
    """SDXL base 1.0 and the released Anima (DiT, LLM adapter, Qwen3-0.6B), on the meta device."""
    import logging

    from diffusers import UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        Qwen3Config,
        Qwen3Model,
    )

    from library.anima.model import Anima, AnimaConfig
    from library.sdxl.config import SDXL_TE1_CONFIG, SDXL_TE2_CONFIG, SDXL_UNET_CONFIG

    quiet = logging.getLogger("networks.network_base")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # the reference networks' creation summary is noise here
    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
            te1 = CLIPTextModel(CLIPTextConfig(**SDXL_TE1_CONFIG))
            te2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TE2_CONFIG))
            dit = Anima(AnimaConfig())
            qwen3 = Qwen3Model(Qwen3Config(**QWEN3_06B))
        return sdxl_reference(unet, te1, te2), anima_reference(dit, qwen3)
    finally:
        quiet.setLevel(level)


def layer_shape_from_tensors(
    name: str, tensors: dict[str, torch.Tensor], kernel: tuple[int, int] | None
) -> tuple[int, ...]:
    """The layer weight shape a module's tensors describe. `kernel` is the layer's kernel when known (None:
    a Linear layer); it is needed where a file flattens I·kh·kw into one dimension (LoHa, low-rank LoKr)."""
    s = {k: tuple(v.shape) for k, v in tensors.items()}
    algo = detect_algorithm(name, s)

    def with_kernel(out: int, flat_in: int) -> tuple[int, ...]:
        if kernel is None:
            return (out, flat_in)
        k = kernel[0] * kernel[1]
        if flat_in % k:
            raise FileError(f"{name}: input size {flat_in} is not a multiple of the kernel {kernel}")
        return (out, flat_in // k, *kernel)

    try:
        if algo == "lora":
            down, up = s["lora_down.weight"], s["lora_up.weight"]
            if "lora_mid.weight" in s:
                return (up[0], down[1], *s["lora_mid.weight"][2:])
            return (up[0], down[1], *down[2:]) if len(down) == 4 else (up[0], down[1])
        if algo == "loha":
            if "hada_t1" in s:
                return (s["hada_w1_a"][1], s["hada_w1_b"][1], *s["hada_t1"][2:])
            return with_kernel(s["hada_w1_a"][0], s["hada_w1_b"][1])
        a, c = s["lokr_w1"][:2] if "lokr_w1" in s else (s["lokr_w1_a"][0], s["lokr_w1_b"][1])
        if "lokr_w2" in s:
            w2 = s["lokr_w2"]
            conv = len(w2) == 4 and (kernel is not None or w2[2:] != (1, 1))
            return (a * w2[0], c * w2[1], *w2[2:]) if conv else (a * w2[0], c * w2[1])
        if "lokr_t2" in s:
            return (a * s["lokr_w2_a"][1], c * s["lokr_w2_b"][1], *s["lokr_t2"][2:])
        return with_kernel(a * s["lokr_w2_a"][0], c * s["lokr_w2_b"][1])
    except KeyError as e:
        raise FileError(f"{name}.{e.args[0]}: missing (needed for a {algo} module)") from None
    except IndexError:
        raise FileError(f"{name}: a tensor has too few dimensions for a {algo} module") from None


def meta_leaf(shape: tuple[int, ...]) -> nn.Module:
    if len(shape) == 4:
        return nn.Conv2d(shape[1], shape[0], tuple(shape[2:]), bias=False, device="meta")
    return nn.Linear(shape[1], shape[0], bias=False, device="meta")


def module_from_tensors(
    name: str,
    tensors: dict[str, torch.Tensor],
    shape: tuple[int, ...],
    dtype: torch.dtype | None = torch.float64,
) -> AdapterModule:
    """The adapter module a file's tensors describe for a layer of weight `shape`; with `dtype` its factors
    are loaded (in that dtype, on the CPU), with None it stays on the meta device (layout only).
    Errors (KeyError / ValueError) name the key."""
    from networks.network_base import module_class_for

    algo = detect_algorithm(name, tensors)
    leaf = meta_leaf(shape)
    module = module_class_for(algo).from_tensors(name, leaf, tensors, 1.0, NetworkArgs(algo=algo))
    if dtype is None:
        return module
    module.to_empty(device="cpu")
    module.to(dtype)
    module.alpha.fill_(module.alpha_value)  # to_empty left the buffer uninitialised
    module.load_file_tensors({k: v.to(dtype) for k, v in tensors.items()})
    return module


def file_kernel(ref: Reference | None, name: str, tensors: dict[str, torch.Tensor]) -> tuple[int, int] | None:
    """The layer kernel of module `name`: from the reference when it has the layer, else from a 4-D tensor."""
    leaf = ref.leaves.get(name) if ref is not None else None
    if leaf is not None:
        return tuple(leaf.weight.shape[2:]) if isinstance(leaf, nn.Conv2d) else None  # type: ignore[return-value]
    for t in tensors.values():
        if t.dim() == 4 and tuple(t.shape[2:]) != (1, 1):
            return (int(t.shape[2]), int(t.shape[3]))
    return None


COMFY_PREFIXES = ("diffusion_model.", "text_encoders.")


def to_sd_scripts_names(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """(tensors under sd-scripts names, naming label, problems). ComfyUI-named Anima files are converted with
    the project's converter; other keys stay as they are."""
    if not any(k.startswith(COMFY_PREFIXES) for k in sd):
        return sd, "sd-scripts (lora_unet_ / lora_te*_)", []
    from networks.convert_anima_lora_to_comfy import ConversionError, from_comfy

    try:
        return from_comfy(sd), "ComfyUI (diffusion_model. / text_encoders.)", []
    except ConversionError as e:
        return sd, "ComfyUI-style, not Anima", [str(e)]


def summed_deltas(
    sds: list[dict[str, torch.Tensor]],
    ratios: list[float],
    ref: Reference | None,
    dtype: torch.dtype,
    labels: list[str],
) -> dict[str, torch.Tensor]:
    """Σ ratioᵢ·ΔWᵢ (each with its own α/r) per module over several files, shaped like the layer weights.
    Any file problem is a FileError naming the file (`labels`) and the key."""
    out: dict[str, torch.Tensor] = {}
    for sd, ratio, label in zip(sds, ratios, labels):
        named, _, problems = to_sd_scripts_names(sd)
        if problems:
            raise FileError(f"{label}: {problems[0]}")
        try:
            groups = group_by_module(named)
            for name, tensors in groups.items():
                if ref is not None and name not in ref.leaves:
                    name = ref.aliases.get(name, name)
                shape = layer_shape_from_tensors(name, tensors, file_kernel(ref, name, tensors))
                with torch.no_grad():
                    dw = module_from_tensors(name, tensors, shape, dtype).delta_weight(ratio).detach()
                if name in out and out[name].shape != dw.shape:
                    raise FileError(
                        f"{name}: layer shape {tuple(dw.shape)} differs from {tuple(out[name].shape)} in an earlier file"
                    )
                out[name] = out[name] + dw if name in out else dw
        except (KeyError, ValueError) as e:
            raise FileError(f"{label}: {e.args[0] if e.args else e}") from None
    return out


def match_reference(names: set[str], refs: tuple[Reference, ...]) -> tuple[Reference | None, dict[str, str]]:
    """The reference that knows most of `names` (directly or through a model-path alias), and the renames
    {file name: reference name} for the aliased ones."""
    best: tuple[int, Reference | None, dict[str, str]] = (0, None, {})
    for ref in refs:
        renames = {n: ref.aliases[n] for n in names if n not in ref.leaves and n in ref.aliases}
        hits = sum(1 for n in names if n in ref.leaves) + len(renames)
        if hits > best[0]:
            best = (hits, ref, renames)
    return best[1], best[2]
