"""The shared LoRA/LoHa/LoKr network: targeting, naming and the sd-scripts network contract.

`create_network_for` / `create_network_from_weights_for` are what `networks.{lora,loha,lokr}` expose as
`create_network` / `create_network_from_weights`. The returned `AdapterNetwork` owns only adapter
tensors; its children are named `lora_name`, so `state_dict()` keys are the file keys.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from networks.arch import Architecture, detect_architecture
from networks.merge import merge_module_into_base
from networks.modules.adapter import AdapterModule, DropoutClock, attach_adapter, detach_adapter, drawn_on_cpu
from networks.network_args import NetworkArgError, NetworkArgs, parse_network_args
from networks.network_io import detect_algorithm, group_by_module, read_weights, write_weights
from networks.network_optim import NetworkOptimMixin
from networks.paths import PathPolicy
from networks.registry import module_class_for
from networks.targeting import (  # noqa: F401  (gen_img reads layer names through this module)
    Root,
    _fullmatch_any,
    as_te_list,
    iter_all_leaves,
    iter_target_leaves,
    lora_name_of,
    model_roots,
    unwrap_model,
)

logger = logging.getLogger(__name__)


class AdapterNetwork(NetworkOptimMixin, nn.Module):
    """The network object handed to sd-scripts-style trainers and gen_img."""

    def __init__(self, algo: str, arch: Architecture, args: NetworkArgs, multiplier: float) -> None:
        super().__init__()
        self.algo = algo
        self.arch = arch
        self.args = args
        self.multiplier = float(multiplier)
        self.block_weights: dict[str, float] = {}  # lora_name -> per-block factor (networks.block_weights)
        self.clock = DropoutClock(0)
        self.text_encoder_loras: list[AdapterModule] = []
        self.unet_loras: list[AdapterModule] = []
        self.excluded_names: list[str] = []
        self.applied = False
        self.loraplus_lr_ratio = args.loraplus_lr_ratio
        self.loraplus_unet_lr_ratio = args.loraplus_unet_lr_ratio
        self.loraplus_text_encoder_lr_ratio = args.loraplus_text_encoder_lr_ratio
        self._trainable: list[nn.Parameter] | None = None
        self._backed_up = False
        self._rank_mask_buffer: torch.Tensor | None = None
        self.path_policy = PathPolicy()  # which forward paths run (networks.paths); the modules share it

    # ---------------------------------------------------------------- building
    def add_adapter(self, m: AdapterModule, te_index: int | None, original_name: str) -> None:
        if m.lora_name in self._modules:
            raise ValueError(f"{m.lora_name}: duplicate module name (two layers map to one file key)")
        m.te_index = te_index
        m.original_name = original_name
        m.index = len(self.text_encoder_loras) + len(self.unet_loras)
        m.clock = self.clock
        m.merged_forward = self.args.merged_forward
        m.set_path_policy(self.path_policy)
        self.add_module(m.lora_name, m)
        (self.unet_loras if te_index is None else self.text_encoder_loras).append(m)

    @property
    def all_loras(self) -> list[AdapterModule]:
        return self.text_encoder_loras + self.unet_loras

    def print_table(self) -> None:
        rows = [m.describe() for m in self.all_loras]
        print(f"{self.algo} network: {len(rows)} modules, {sum(r['params'] for r in rows):,} params")
        print(
            f"{'name':<72} {'shape':>16} {'layout':<40} {'rank':>5} {'alpha':>20} {'scale':>8} {'params':>10}"
        )
        for r in rows:
            alpha = r["alpha"] if isinstance(r["alpha"], str) else f"{r['alpha']:g}"
            print(
                f"{r['name']:<72} {r['shape']:>16} {r['layout']:<40} {r['rank']:>5} {alpha:>20} "
                f"{r['scale']:>8.4g} {r['params']:>10,}"
            )
        for n in self.excluded_names:
            print(f"excluded: {n}")

    # ---------------------------------------------------------------- the contract
    def set_multiplier(self, multiplier: float) -> None:
        """Every module's multiplier = `multiplier` × its block weight (1 unless set_block_weights set one)."""
        self.multiplier = float(multiplier)
        for m in self.all_loras:
            m.multiplier = self.multiplier * self.block_weights.get(m.lora_name, 1.0)

    def set_block_weights(self, weight_of: Callable[[str], float] | None) -> None:
        """A factor per module, from its name (e.g. `BlockWeights.weight_of`); None clears them. Kept across
        set_multiplier, and used by merge_to and pre_calculation since they merge at each module's multiplier."""
        self.block_weights = (
            {} if weight_of is None else {m.lora_name: float(weight_of(m.lora_name)) for m in self.all_loras}
        )
        self.set_multiplier(self.multiplier)

    def set_enabled(self, is_enabled: bool) -> None:
        for m in self.all_loras:
            m.enabled = bool(is_enabled)

    def set_path_policy(self, path: str | None = None, mode: str | None = None) -> None:
        """Choose the forward paths of every module (networks.paths): `path` 'auto' (cost model), 'rebuild' or
        'bypass'; `mode` 'eager', or 'graph' for compiled / graph-replayed steps. None keeps the current value.
        Set it before the first forward: modules remember their choice per input size."""
        p = self.path_policy
        self.path_policy = PathPolicy(p.path if path is None else path, p.mode if mode is None else mode)
        for m in self.all_loras:
            m.set_path_policy(self.path_policy)

    def set_dropout_seed(self, seed: int) -> None:
        """Seed of every dropout draw (with the step counter and module index); same on all ranks."""
        self.clock.seed = int(seed)

    def on_step_start(self, text_encoder: Any = None, unet: Any = None) -> None:
        self.clock.step += 1
        self.prepare_step_masks()

    def use_device_module_dropout(self) -> None:
        """Module dropout as a 0/1 factor on the branch, read from the per-step buffer, instead of skipping the
        branch in Python: what a CUDA graph can replay and torch.compile can trace. Same decisions and outputs;
        a dropped module's factors get a zero grad instead of none (its branch is computed, then ×0)."""
        for m in self.all_loras:
            m.module_dropout_on_device = True

    def prepare_step_masks(self) -> None:
        """Draw this step's rank-dropout masks (and, on the device path, module-dropout keeps) on the CPU and
        copy them to the device in one go.

        Each module reads its slice of one buffer at a fixed address: no per-module generator or copy
        in the forward, the same masks in gradient-checkpoint recomputation, and capturable by a CUDA graph.
        """
        rank_mods = [m for m in self.all_loras if m.rank_dropout]
        keep_mods = [m for m in self.all_loras if m.module_dropout and m.module_dropout_on_device]
        if not rank_mods and not keep_mods:
            return
        device = (rank_mods or keep_mods)[0]._org_device()
        sizes = [m.out_dim for m in rank_mods] + [1] * len(keep_mods)
        buf = self._rank_mask_buffer
        if buf is None or buf.device != device or buf.numel() != sum(sizes):
            buf = torch.empty(sum(sizes), dtype=torch.float32, device=device)
            self._rank_mask_buffer = buf
            views = torch.split(buf, sizes)
            for m, view in zip(rank_mods, views):
                m.rank_scale = view
            for m, view in zip(keep_mods, views[len(rank_mods) :]):
                m.module_keep = view
        parts = [m.rank_keep_scale_cpu() for m in rank_mods]
        if keep_mods:
            parts.append(torch.tensor([m.module_keep_cpu() for m in keep_mods], dtype=torch.float32))
        host = torch.cat(parts)
        buf.copy_(host)  # synchronous from pageable memory: the host tensor may be freed right after
        for m in rank_mods:
            m.rank_scale_step = self.clock.step
        for m in keep_mods:
            m.module_keep_step = self.clock.step

    def on_epoch_start(self, text_encoder: Any = None, unet: Any = None) -> None:
        self.train()

    def enable_gradient_checkpointing(self) -> None:
        # Adapters are recomputed inside the trainer's checkpointed blocks; dropout is RNG-state free.
        logger.info("%s network: gradient checkpointing is done by the trainer on the base model", self.algo)

    def is_mergeable(self) -> bool:
        return True

    def apply_to(
        self, text_encoders: Any, unet: Any, apply_text_encoder: bool = True, apply_unet: bool = True
    ) -> None:
        if self.applied:
            raise RuntimeError("apply_to: this network is already applied")
        drop: list[AdapterModule] = []
        if not apply_text_encoder:
            drop += self.text_encoder_loras
            self.text_encoder_loras = []
        if not apply_unet:
            drop += self.unet_loras
            self.unet_loras = []
        for m in drop:
            delattr(self, m.lora_name)
        for m in self.all_loras:
            attach_adapter(m.org_module, m)
        self.applied = True
        left_out = []
        if not apply_text_encoder and drop:
            left_out.append("the text encoder is not trained")
        if not apply_unet and drop:
            left_out.append("the U-Net/DiT is not trained")
        logger.info(
            "%s network applied: %d text-encoder modules, %d unet modules%s",
            self.algo,
            len(self.text_encoder_loras),
            len(self.unet_loras),
            f" ({len(drop)} created modules left out: {'; '.join(left_out)})" if left_out else "",
        )

    def remove_from(self) -> None:
        """Unpatch every layer (any order with other networks)."""
        for m in self.all_loras:
            detach_adapter(m.org_module, m)
        self.applied = False

    def file_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for m in self.all_loras:
            for k, v in m.file_tensors(dtype).items():
                out[f"{m.lora_name}.{k}"] = v
        return out

    def save_weights(
        self, file: str | os.PathLike[str], dtype: torch.dtype | None, metadata: dict[str, str] | None
    ) -> None:
        if metadata is not None and len(metadata) == 0:
            metadata = None
        write_weights(file, self.file_state_dict(dtype), metadata)

    def load_weights(self, file: str | os.PathLike[str] | dict[str, torch.Tensor]) -> str:
        """Strict load (resume): a missing, unexpected or mis-shaped key is an error naming it."""
        sd = file if isinstance(file, dict) else read_weights(file)[0]
        groups = group_by_module(sd)
        mods = {m.lora_name: m for m in self.all_loras}
        for name, tensors in groups.items():
            if name not in mods:
                key = f"{name}.{sorted(tensors)[0]}"
                raise KeyError(f"{key}: unexpected key, this network has no module {name!r}")
        for name, m in mods.items():
            if name not in groups:
                raise KeyError(f"{name}.*: missing from the weights (module {name!r} has no tensors)")
            m.load_file_tensors(groups[name])
        return f"loaded {len(groups)} modules"

    # ---------------------------------------------------------------- merge / inference helpers
    def _halves_in(self, weights_sd: dict[str, torch.Tensor]) -> tuple[bool, bool]:
        te = any(k.startswith("lora_te") for k in weights_sd)
        un = any(k.startswith(self.arch.unet_prefix + "_") for k in weights_sd)
        return te, un

    @torch.no_grad()
    def merge_to(
        self,
        text_encoders: Any,
        unet: Any,
        weights_sd: dict[str, torch.Tensor],
        dtype: Any = None,
        device: Any = None,
    ) -> None:
        """W ← W + m·ΔW in fp32 from the file's tensors, cast once; modules are not hooked."""
        apply_te, apply_unet = self._halves_in(weights_sd)
        groups = group_by_module(weights_sd)
        used: set[str] = set()
        for m in self.all_loras:
            if (m.te_index is None and not apply_unet) or (m.te_index is not None and not apply_te):
                continue
            tensors = groups.get(m.lora_name)
            if tensors is None:
                continue
            m.load_file_tensors(tensors)
            merge_module_into_base(m, m.multiplier, device)
            used.add(m.lora_name)
        unused = sorted(k for k in weights_sd if k.partition(".")[0] not in used)
        if unused:
            logger.warning("merge_to: %d keys were not merged: %s", len(unused), ", ".join(unused[:20]))
        logger.info("merged %d %s modules", len(used), self.algo)

    @torch.no_grad()
    def backup_weights(self) -> None:
        if self._backed_up:
            return
        for m in self.all_loras:
            m._backup = m.org_module.weight.detach().clone()
        self._backed_up = True

    @torch.no_grad()
    def restore_weights(self) -> None:
        for m in self.all_loras:
            if m._backup is not None:
                m.org_module.weight.data.copy_(m._backup)
            m.enabled = True

    @torch.no_grad()
    def pre_calculation(self) -> None:
        for m in self.all_loras:
            merge_module_into_base(m, m.multiplier)
            m.enabled = False

    @torch.no_grad()
    def apply_max_norm_regularization(
        self, max_norm_value: float, device: Any = None
    ) -> tuple[int, float, float]:
        # One host sync for the whole network: every module is scaled by its ratio (×1 is exact when
        # nothing is clamped), and the count / mean / max are read back once at the end.
        norms: list[torch.Tensor] = []
        ratios: list[torch.Tensor] = []
        for m in self.all_loras:
            raw = m.norm_for_max().float()
            n = raw.clamp(min=max_norm_value / 2)  # the clamp only keeps the ratio finite for ΔW = 0
            ratio = n.clamp(max=max_norm_value) / n
            m.scale_for_max(ratio)
            norms.append(raw * ratio)  # the module's real norm after scaling, as sd-scripts reports it
            ratios.append(ratio)
        if not norms:
            return 0, 0.0, 0.0
        dev = norms[0].device
        stacked = torch.stack([t.to(dev) for t in norms])
        stats = torch.stack(
            [(torch.stack([r.to(dev) for r in ratios]) != 1).sum().float(), stacked.mean(), stacked.max()]
        ).tolist()
        return int(stats[0]), float(stats[1]), float(stats[2])


# -------------------------------------------------------------------- creation
def create_network_for(
    algo: str,
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    text_encoder: Any,
    unet: Any,
    neuron_dropout: float | None,
    kwargs: dict[str, Any],
) -> AdapterNetwork:
    args = parse_network_args(algo, kwargs, neuron_dropout)
    if network_dim is None:
        network_dim = 4
    try:
        dim = int(network_dim)
    except (TypeError, ValueError):
        dim = -1
    if dim < 1 or dim != network_dim:
        raise ValueError(f"network_dim={network_dim!r}: expected a positive integer rank")
    try:
        alpha = 1.0 if network_alpha is None else float(network_alpha)
        multiplier = float(multiplier)
    except (TypeError, ValueError):
        raise ValueError(
            f"network_alpha={network_alpha!r} / multiplier={multiplier!r}: expected numbers"
        ) from None
    # α = 0 (or None) means "α = r" per module, so reg_dims / conv modules get their own rank (modules.alpha)
    tes = as_te_list(text_encoder)
    unet = unwrap_model(unet)
    arch = detect_architecture(tes, unet)
    arch.warn_unsupported(args)
    excludes = [re.compile(p) for p in (*arch.default_excludes, *args.exclude_patterns)]
    includes = [re.compile(p) for p in args.include_patterns]
    reg_dims = [(re.compile(p), d) for p, d in args.reg_dims]
    reg_dim_used = [False] * len(reg_dims)
    cls = module_class_for(algo)
    net = AdapterNetwork(algo, arch, args, multiplier)
    for root in model_roots(arch, tes, unet, args):
        for original, leaf in iter_target_leaves(root):
            kxk = isinstance(leaf, nn.Conv2d) and tuple(leaf.kernel_size) != (1, 1)
            if kxk and args.conv_dim is None:
                continue
            name = lora_name_of(root.prefix, original)
            if _fullmatch_any(excludes, original) and not _fullmatch_any(includes, original):
                net.excluded_names.append(name)
                continue
            rank, a = (args.conv_dim, args.conv_alpha) if kxk else (dim, alpha)
            for i, (pat, d) in enumerate(reg_dims):
                if pat.fullmatch(original):
                    reg_dim_used[i] = True
                    rank, a = d, alpha
                    break
            if rank == 0:
                net.excluded_names.append(name)
                continue
            with drawn_on_cpu():  # the same starting values whether the model is on the CPU or the device
                module = cls.create(name, leaf, multiplier, int(rank), a, args)
            net.add_adapter(module.to(leaf.weight.device), root.te_index, original)
    for used, (pat, _) in zip(reg_dim_used, reg_dims):
        if not used:
            raise NetworkArgError(f"network_args network_reg_dims: pattern {pat.pattern!r} matches no module")
    if not net.all_loras:
        raise NetworkArgError(
            "network_args exclude_patterns / include_patterns / network_reg_dims: the selection matches zero modules "
            f"(targets: {', '.join(arch.unet_target_classes + arch.te_target_classes)})"
        )
    _log_summary(net)
    if args.any_loraplus:
        net.set_loraplus_lr_ratio(
            args.loraplus_lr_ratio, args.loraplus_unet_lr_ratio, args.loraplus_text_encoder_lr_ratio
        )
    if args.verbose:
        net.print_table()
    return net


def _log_summary(net: AdapterNetwork) -> None:
    module_class_for(net.algo).log_created(net.all_loras, net.args)
    logger.info(
        "create %s network: %d text-encoder modules, %d unet modules, %d excluded",
        net.algo,
        len(net.text_encoder_loras),
        len(net.unet_loras),
        len(net.excluded_names),
    )


def _rename_model_path_keys(
    weights_sd: dict[str, torch.Tensor], leaves: dict[str, Any], aliases: dict[str, str]
) -> dict[str, torch.Tensor]:
    """Files keyed by model paths (Diffusers-style `lora_unet_down_blocks_…`) get original names."""
    renamed: dict[str, torch.Tensor] = {}
    count = 0
    for key, t in weights_sd.items():
        name, dot, rest = key.partition(".")
        if name not in leaves and name in aliases:
            key = aliases[name] + dot + rest
            count += 1
        renamed[key] = t
    if count:
        logger.info("renamed %d model-path keys to original (SGM) module names", count)
        return renamed
    return weights_sd


def create_network_from_weights_for(
    algo: str,
    multiplier: float,
    file: str | None,
    text_encoder: Any,
    unet: Any,
    weights_sd: dict[str, torch.Tensor] | None,
    for_inference: bool,
    kwargs: dict[str, Any],
) -> tuple[AdapterNetwork, dict[str, torch.Tensor]]:
    """Build modules for exactly the names in the file; layout, rank, α per module from the tensors."""
    if weights_sd is None:
        if file is None:
            raise ValueError("file: a weights file is required when weights_sd is not given")
        weights_sd = read_weights(file)[0]
    args = parse_network_args(algo, kwargs)
    tes = as_te_list(text_encoder)
    unet = unwrap_model(unet)
    arch = detect_architecture(tes, unet)
    leaves: dict[str, tuple[nn.Module, int | None, str]] = {}
    aliases: dict[str, str] = {}  # model-path (e.g. diffusers) names → original-path names
    for root in model_roots(arch, tes, unet, None):
        for original, path, leaf in iter_all_leaves(root):
            name = lora_name_of(root.prefix, original)
            leaves.setdefault(name, (leaf, root.te_index, original))
            aliases.setdefault(lora_name_of(root.prefix, path), name)
    weights_sd = _rename_model_path_keys(weights_sd, leaves, aliases)
    net = AdapterNetwork(algo, arch, args, multiplier)
    foreign: dict[str, int] = {}
    for name, tensors in group_by_module(weights_sd).items():
        if name not in leaves:
            raise KeyError(f"{name}.{sorted(tensors)[0]}: no layer named {name!r} in the given models")
        module_algo = detect_algorithm(name, tensors)
        if module_algo != algo:
            foreign[module_algo] = foreign.get(module_algo, 0) + 1
        leaf, te_index, original = leaves[name]
        module = module_class_for(module_algo).from_tensors(name, leaf, tensors, multiplier, args)
        net.add_adapter(module, te_index, original)
    if not net.all_loras:
        raise ValueError(f"file {file!r}: contains no network modules")
    if foreign:
        logger.info(
            "networks.%s: file also holds %s modules; loading them with their own algorithm", algo, foreign
        )
    if args.any_loraplus and not for_inference:
        net.set_loraplus_lr_ratio(
            args.loraplus_lr_ratio, args.loraplus_unet_lr_ratio, args.loraplus_text_encoder_lr_ratio
        )
    if args.verbose:
        net.print_table()
    return net, weights_sd
