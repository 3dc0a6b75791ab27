"""Merging network files into loaded model weights, for the checkpoint merge tools (SDXL and Anima).

Each file goes through the project's own loader (`create_network_from_weights`, every module with its own
algorithm, so LoRA / LoHa / LoKr mix freely) and `merge_to`: W ← W + ratio·ΔW in fp32, cast back once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from library.tools.file_modules import FileError, read_network_file, to_sd_scripts_names
from networks.block_weights import BlockWeights, apply_block_weights
from networks.network_io import detect_algorithm, group_by_module

logger = logging.getLogger(__name__)


def merge_network_files(
    text_encoders: list[nn.Module],
    unet: nn.Module,
    files: list[str],
    ratios: list[float],
    rename: Callable[[str], str] | None = None,
    drop: Callable[[str], bool] | None = None,
    block_weights: list[BlockWeights | None] | None = None,
) -> list[str]:
    """Merge every file at its ratio (times its block's weight per module when given); returns one summary
    line per file. `rename` maps file module names (e.g. LyCORIS aliases), `drop` leaves modules out."""
    from networks.network_base import create_network_from_weights_for

    lines = []
    for i, (path, ratio) in enumerate(zip(files, ratios)):
        sd, _ = read_network_file(path, "--models")
        sd, _, problems = to_sd_scripts_names(sd)
        if problems:
            raise FileError(f"--models {path}: {problems[0]}")
        if rename is not None:
            sd = {rename(k.partition(".")[0]) + "." + k.partition(".")[2]: v for k, v in sd.items()}
        dropped = sorted({k.partition(".")[0] for k in sd if drop is not None and drop(k)})
        sd = {k: v for k, v in sd.items() if k.partition(".")[0] not in dropped}
        try:
            groups = group_by_module(sd)
            algos = [detect_algorithm(name, t) for name, t in groups.items()]
            if not algos:
                raise FileError(f"--models {path}: no module left to merge")
            net, sd = create_network_from_weights_for(
                algos[0], ratio, None, text_encoders, unet, sd, True, {}
            )
        except (KeyError, ValueError) as e:
            raise FileError(f"--models {path}: {e.args[0] if e.args else e}") from None
        weights = block_weights[i] if block_weights is not None else None
        if weights is not None:
            apply_block_weights(net, weights, f"--block_weights {path}")
        with torch.no_grad():
            net.merge_to(text_encoders, unet, sd)
        counts: dict[str, int] = {}
        for a in algos:
            counts[a] = counts.get(a, 0) + 1
        what = ", ".join(f"{n} {a}" for a, n in sorted(counts.items()))
        skipped = f"; {len(dropped)} modules left out" if dropped else ""
        per_block = " with block weights" if weights is not None else ""
        lines.append(
            f"{path}: merged {len(net.all_loras)} modules ({what}) at ratio {ratio:g}{per_block}{skipped}"
        )
    return lines
