"""Small helpers of the training loop: network module import, --network_args, loss averages, log and sample
names (--fp8_base lives in networks/fp8.py)."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

from networks.network_args import split_key_values

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def import_network_module(name: str) -> ModuleType:
    """Import ``--network_module`` with the project root on ``sys.path`` (users pass ``networks.lora``)."""
    if str(PROJECT_ROOT) not in sys.path:
        sys.path.insert(0, str(PROJECT_ROOT))
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise ImportError(
            f"--network_module {name!r} cannot be imported ({e}); use e.g. networks.lora, networks.loha, networks.lokr"
        ) from e
    missing = [f for f in ("create_network", "create_network_from_weights") if not hasattr(module, f)]
    if missing:
        raise ImportError(f"--network_module {name!r} is not a network module: it lacks {', '.join(missing)}")
    return module


def parse_network_args(tokens: list[str] | None) -> dict[str, str]:
    """`--network_args k=v k2=v2`: each token split at the first ``=`` (the module converts the values)."""
    return split_key_values(tokens or [], "key=value key2=value2")


class LossRecorder:
    """sd-scripts' moving average: one slot per step of an epoch, replaced in later epochs."""

    def __init__(self) -> None:
        self.slots: list[float] = []
        self.total = 0.0

    def add(self, epoch: int, step: int, loss: float) -> None:
        if step < len(self.slots):  # same slot of an earlier epoch: replace it
            self.total += loss - self.slots[step]
            self.slots[step] = loss
        else:
            self.slots.append(loss)
            self.total += loss

    @property
    def moving_average(self) -> float:
        return self.total / len(self.slots) if self.slots else 0.0


def lr_log_names(
    descriptions: list[str] | None, n_groups: int, train_unet: bool, train_te: bool
) -> list[str]:
    """TensorBoard names ``lr/<name>`` of the optimizer groups, unique even if a module repeats one.

    Our networks describe groups (``textencoder 1``, ``textencoder 2``, ``unet``, ``... plus``); a module
    without descriptions gets ``textencoder``/``unet`` for the usual one- or two-group layouts, else
    ``group<i>``. A repeated description gets `` group<i>`` appended so no two groups share a key.
    """
    if descriptions and len(descriptions) == n_groups:
        names = [str(d) for d in descriptions]
    elif n_groups == 2 and train_unet and train_te:
        names = ["textencoder", "unet"]
    elif n_groups == 1:
        names = ["unet" if train_unet else "textencoder"]
    else:
        names = [f"group{i}" for i in range(n_groups)]
    return [n if names.count(n) == 1 else f"{n} group{i}" for i, n in enumerate(names)]


def sample_file_name(output_name: str | None, epoch: int | None, step: int, index: int, stamp: str) -> str:
    """``<output_name_>{e%06d|%06d}_%02d_<YYYYmmddHHMMSS>`` (the sampler appends ``[_seed].png``)."""
    prefix = f"{output_name}_" if output_name else ""
    when = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    return f"{prefix}{when}_{index:02d}_{stamp}"
