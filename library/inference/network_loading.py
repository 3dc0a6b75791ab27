"""Networks for SDXL inference: read each file, check it fits the model, then merge it or apply it live.

A file's module names are checked against every name the model offers before anything is built, so a
network for another model (or architecture) stops with one line listing what does not match, instead of
loading as a silent no-op. Used by `gen_img.py`, which turns its flags into `NetworkRequest`s.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from networks.block_weights import BlockWeights, apply_block_weights

logger = logging.getLogger("gen_img")  # the messages read as the script's, as before they moved here


@dataclass
class NetworkRequest:
    """One `--network_module` / `--network_weights` pair with its multiplier, kwargs and block weights."""

    module_name: str
    weights_path: str
    multiplier: float = 1.0
    kwargs: dict[str, str] = field(default_factory=dict)
    block_weights: BlockWeights | None = None


@dataclass
class LoadedNetwork:
    module_name: str
    weights_path: str
    multiplier: float
    merged: bool
    network: Any = None  # the live network (None once merged: its modules are not kept)
    algorithms: dict[str, int] = field(default_factory=dict)


def _file_module_names(weights_sd: dict[str, torch.Tensor]) -> dict[str, str]:
    """lora_name -> algorithm, from the file's keys (the text before the first dot names the module)."""
    from networks.network_io import detect_algorithm, group_by_module

    return {name: detect_algorithm(name, tensors) for name, tensors in group_by_module(weights_sd).items()}


def _built_module_names(network: torch.nn.Module) -> set[str]:
    return {m.lora_name for m in network.modules() if isinstance(getattr(m, "lora_name", None), str)}


def _short(names: Sequence[str], n: int = 12) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def model_layer_names(text_encoders: Sequence[torch.nn.Module], unet: torch.nn.Module) -> set[str]:
    """Every module name a network file may use on this model (the networks' own naming code): the
    original (SGM) names and the model-path (diffusers) names the loader renames."""
    from networks.arch import detect_architecture
    from networks.network_base import iter_all_leaves, lora_name_of, model_roots

    arch = detect_architecture(list(text_encoders), unet)
    names: set[str] = set()
    for root in model_roots(arch, list(text_encoders), unet, None):
        for item in iter_all_leaves(root):  # (original, leaf) or (original, model path, leaf)
            names.update(lora_name_of(root.prefix, p) for p in item[:-1])
    return names


def check_file_names(file_algos: dict[str, str], available: set[str], module_name: str, path: str) -> None:
    """Every module named in the file must exist (or have been built): no silent no-op, all names listed."""
    missing = sorted(set(file_algos) - available)
    if not missing:
        return
    if not available & set(file_algos):
        prefixes = sorted({"_".join(k.split("_")[:3]) for k in file_algos})
        raise ValueError(
            f"--network_weights {path}: none of its {len(file_algos)} modules match this SDXL model "
            f"(name prefixes: {', '.join(prefixes[:6])}); is it a network for another architecture "
            "(e.g. Anima 'lora_unet_blocks_*') or another model? SDXL names look like "
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q or lora_te1_text_model_encoder_layers_0_mlp_fc1"
        )
    algos = sorted({file_algos[k] for k in missing})
    raise ValueError(
        f"--network_weights {path}: {len(missing)} of {len(file_algos)} modules in the file match no layer "
        f"of this model for {module_name} ({'/'.join(algos)} keys): {_short(missing)}"
    )


OUR_ALGORITHMS = {"networks.lora": "lora", "networks.loha": "loha", "networks.lokr": "lokr"}


def check_algorithm_matches(module_name: str, file_algos: dict[str, str], path: str) -> None:
    """A file with no module of the requested algorithm is a mismatch (mixed LyCORIS files still load)."""
    wanted = OUR_ALGORITHMS.get(module_name)
    found = sorted(set(file_algos.values()))
    if wanted is None or not found or wanted in found:
        return
    suggestion = " or ".join(f"networks.{a}" for a in found)
    raise ValueError(
        f"--network_module {module_name} does not match --network_weights {path}: the file holds "
        f"{'/'.join(a.upper() for a in found)} modules and no {wanted.upper()} module; use --network_module {suggestion}"
    )


def _import_network_module(module_name: str, path: str) -> tuple[Any, str, bool]:
    """The module to build the network with, its name, and whether the file came from LyCORIS."""
    from library.sdxl.loading import is_sgm_only_network_module

    lycoris_file = is_sgm_only_network_module(module_name)
    if lycoris_file:
        # LyCORIS cannot target the diffusers U-Net; our loader reads its files (algorithm per module)
        logger.warning(
            "--network_module %s: reading %s with networks.lora's loader (LoRA/LoHa/LoKr per module)",
            module_name,
            path,
        )
        module_name = "networks.lora"
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--network_module {module_name!r} cannot be imported: {e}") from e
    if not hasattr(module, "create_network_from_weights"):
        raise ValueError(f"--network_module {module_name!r} has no create_network_from_weights()")
    return module, module_name, lycoris_file


def _read_network_file(path: str, show_meta: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's tensors and each module's algorithm; an unreadable or foreign file is one error line."""
    from networks.network_io import read_weights

    weights_sd, metadata = read_weights(path, "--network_weights")  # unreadable: one line naming it
    try:
        if show_meta:
            logger.info("metadata of %s: %s", path, metadata)
        file_algos = _file_module_names(weights_sd)
    except Exception as e:  # unknown keys
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise ValueError(f"--network_weights {path}: cannot be loaded as a network file: {msg}") from e
    return weights_sd, file_algos


def _build_network(
    req: NetworkRequest, models: Any, layer_names: set[str], show_meta: bool
) -> tuple[Any, str, dict[str, torch.Tensor], dict[str, str]]:
    """Build one network from its file, after checking that every module in it has a layer to adapt."""
    module, module_name, lycoris_file = _import_network_module(req.module_name, req.weights_path)
    path = req.weights_path
    weights_sd, file_algos = _read_network_file(path, show_meta)
    check_file_names(file_algos, layer_names, module_name, path)
    if not lycoris_file:
        check_algorithm_matches(module_name, file_algos, path)
    text_encoders = [models.text_encoder_1, models.text_encoder_2]
    try:
        network, weights_sd = module.create_network_from_weights(
            req.multiplier,
            path,
            models.vae,
            text_encoders,
            models.unet,
            weights_sd=weights_sd,
            for_inference=True,
            **req.kwargs,
        )
    except KeyError as e:  # the module names the offending key; keep its words, not KeyError's quotes
        raise ValueError(f"--network_weights {path}: {e.args[0] if e.args else e}") from e
    if network is None:
        raise ValueError(f"--network_module {module_name} returned no network for {path}")
    # a third-party module could skip names silently; ours raise, this catches the rest
    check_file_names(file_algos, _built_module_names(network), module_name, path)
    foreign = sorted({a for a in file_algos.values()} - {module_name.rsplit(".", 1)[-1]})
    if module_name.startswith("networks.") and foreign:
        logger.info(
            "%s: file holds %s modules; %s loads them with their own algorithm",
            path,
            foreign,
            module_name,
        )
    return network, module_name, weights_sd, file_algos


def load_networks(
    requests: Sequence[NetworkRequest],
    models: Any,
    n_merge: int,
    show_meta: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> list[LoadedNetwork]:
    """Create each network from its file; merge the first `n_merge` into the weights, apply the rest live."""
    text_encoders = [models.text_encoder_1, models.text_encoder_2]
    layer_names = model_layer_names(text_encoders, models.unet) if requests else set()
    loaded: list[LoadedNetwork] = []
    for i, req in enumerate(requests):
        path, mul = req.weights_path, req.multiplier
        network, module_name, weights_sd, file_algos = _build_network(req, models, layer_names, show_meta)
        counts: dict[str, int] = {}
        for algo in file_algos.values():
            counts[algo] = counts.get(algo, 0) + 1
        if req.block_weights is not None:  # before merge_to: it merges at each module's multiplier
            apply_block_weights(network, req.block_weights, f"--network_block_weights (network {i + 1})")
        merge = i < n_merge and network.is_mergeable()
        if i < n_merge and not merge:
            logger.warning("%s: network is not mergeable, applying it as modules instead", path)
        if merge:
            network.merge_to(text_encoders, models.unet, weights_sd, dtype, device)
            network = None  # its tensors now live in the model weights
        else:
            network.apply_to(text_encoders, models.unet)
            try:
                network.load_state_dict(weights_sd, strict=True)
            except RuntimeError as e:
                raise ValueError(f"--network_weights {path}: tensors do not fit {module_name}: {e}") from e
            network.to(device=device, dtype=dtype)
            network.eval().requires_grad_(False)
        logger.info(
            "network %d: %s %s x%s, %s (%s)",
            i + 1,
            module_name,
            path,
            mul,
            "merged" if merge else "live",
            ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
        )
        loaded.append(LoadedNetwork(module_name, path, mul, merge, network, counts))
    return loaded
