"""The resumable training state (``--save_state`` folders) and the checks ``--resume`` makes.

A state folder is written into a temp folder and swapped in whole, so it is never half-written. It
records the flags that shape the network and the optimizer (``run_settings.json``); ``--resume`` compares
them with the new run before any model is loaded, then compares the saved network's tensor names and
shapes with the network built, so a mismatch is one line naming ``--resume``, the folder and what differs.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from library.io.atomic_io import atomic_dir
from library.io.errors import InputError
from library.training import saving
from networks.tensor_files import check_archive, check_tensor_file, safetensors_header

NETWORK_STATE_FILE = "network.safetensors"
STEP_STARTS_FILE = "network_step_starts.txt"
LOOP_POSITION_FILE = "loop_position.txt"
SETTINGS_FILE = "run_settings.json"
REQUIRED_FILES = (saving.TRAIN_STATE_FILE, NETWORK_STATE_FILE, "optimizer.bin")

# flag -> how it is shown; these change the network's tensors or the optimizer's state layout
_SHAPING_FLAGS = ("network_module", "network_dim", "network_alpha", "network_train_unet_only",
                  "network_train_text_encoder_only", "optimizer")  # fmt: skip


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The flags a state must share with the run that resumes it (plus --network_args, shown on mismatch)."""
    from library.training.optimizers import optimizer_class_name

    out = {k: getattr(args, k, None) for k in _SHAPING_FLAGS if k != "optimizer"}
    out["optimizer"] = optimizer_class_name(args)
    out["network_args"] = list(args.network_args or [])
    return out


def _flag_text(key: str, value: Any) -> str:
    if key == "optimizer":
        return f"--optimizer_type {str(value).rsplit('.', 1)[-1]}"
    if key == "network_args":
        return f"--network_args {' '.join(value)}" if value else "no --network_args"
    if isinstance(value, bool) or value is None:
        return f"--{key}" if value else f"no --{key}"
    return f"--{key} {value}"


def check_resume_folder(args: argparse.Namespace) -> None:
    """Before any model loads: the folder is a whole state folder saved with the same shaping flags."""
    folder = Path(args.resume)
    label = f"--resume {folder}"
    missing = [n for n in REQUIRED_FILES if not (folder / n).is_file()]
    if missing:
        raise InputError(
            f"{label}: not a --save_state folder (missing {', '.join(missing)}); expected a folder such as "
            f"<output_dir>/<output_name>-step00000010-state"
        )
    try:
        saving.read_train_state(folder)
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(
            f"{label}: {saving.TRAIN_STATE_FILE} is damaged ({e}); expected a --save_state folder"
        ) from e
    check_tensor_file(
        folder / NETWORK_STATE_FILE, "--resume", allow_torch=False, expected="a --save_state file"
    )
    for f in sorted(folder.glob("*.bin")) + sorted(folder.glob("random_states_*.pkl")):
        check_archive(f, "--resume", expected="a file written by --save_state")
    settings_file = folder / SETTINGS_FILE
    if not settings_file.is_file():
        return  # an older state folder: the network check after building still applies
    try:
        saved = json.loads(settings_file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise InputError(f"{label}: {SETTINGS_FILE} is damaged ({e})") from e
    now = run_settings(args)
    diff = [k for k in _SHAPING_FLAGS if k in saved and saved[k] != now[k]]
    if diff:
        was = ", ".join(_flag_text(k, saved[k]) for k in diff)
        new = ", ".join(_flag_text(k, now[k]) for k in diff)
        raise InputError(
            f"{label}: the state was saved with {was}, this run has {new}; expected the flags of the run that "
            "saved it"
        )


def _example(names: list[str]) -> str:
    return f"e.g. {names[0]}" + (f" and {len(names) - 1} more" if len(names) > 1 else "")


def check_network_fits(args: argparse.Namespace, network: torch.nn.Module) -> None:
    """After the network is built, before anything is loaded: the same tensor names and shapes."""
    folder = Path(args.resume)
    saved, _ = safetensors_header(folder / NETWORK_STATE_FILE, "--resume")
    now = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    missing = sorted(set(now) - set(saved))
    extra = sorted(set(saved) - set(now))
    reshaped = sorted(k for k in set(now) & set(saved) if saved[k][1] != now[k])
    if not (missing or extra or reshaped):
        return
    parts = []
    if reshaped:
        k = reshaped[0]
        parts.append(f"{len(reshaped)} tensors differ in shape (e.g. {k}: saved {list(saved[k][1])}, "
                     f"now {list(now[k])})")  # fmt: skip
    if missing:
        parts.append(f"{len(missing)} tensors of this network are not in the state ({_example(missing)})")
    if extra:
        parts.append(f"{len(extra)} saved tensors have no place in this network ({_example(extra)})")
    hint = "another --network_dim, --network_module or --network_args"
    settings_file = folder / SETTINGS_FILE
    if settings_file.is_file():
        saved_args = json.loads(settings_file.read_text(encoding="utf-8")).get("network_args")
        if saved_args is not None and saved_args != list(args.network_args or []):
            hint = f"{_flag_text('network_args', saved_args)} (this run: {_flag_text('network_args', args.network_args)})"
    raise InputError(
        f"--resume {folder}: the saved network does not fit this run's network: {'; '.join(parts)}; "
        f"it was saved with {hint}"
    )


@dataclass
class ResumePoint:
    epoch: int
    step: int
    skip_batches: int  # batches of ``epoch`` already done
    step_starts: int  # the network's dropout clock


def load_resume_state(
    args: argparse.Namespace, accelerator: Accelerator, network: torch.nn.Module, optimizer: Any,
    optimizer_desc: str,
) -> ResumePoint:  # fmt: skip
    """Load optimizer/scheduler/RNG (weights_only) and the network; errors name --resume and the folder."""
    folder = Path(args.resume)
    check_network_fits(args, network)
    expected_keys = [set(g) for g in optimizer.param_groups]
    try:
        # every file is read with weights_only=True (numpy RNG arrays are allow-listed by accelerate)
        accelerator.load_state(str(folder), load_kwargs={"weights_only": True})
    except (ValueError, KeyError, IndexError, TypeError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(
            f"--resume {folder}: the saved optimizer/scheduler state does not fit this run's optimizer "
            f"{optimizer_desc} ({first}); expected a state saved with the same --optimizer_type and network"
        ) from e
    if not (folder / SETTINGS_FILE).is_file():  # otherwise check_resume_folder compared the optimizer class
        _check_optimizer_kind(folder, optimizer.param_groups, expected_keys, optimizer_desc)
    sd = load_file(str(folder / NETWORK_STATE_FILE))
    network.load_state_dict({k: v.to(accelerator.device) for k, v in sd.items()}, strict=True)
    state = saving.read_train_state(folder)
    pos_file, starts_file = folder / LOOP_POSITION_FILE, folder / STEP_STARTS_FILE
    return ResumePoint(
        epoch=state["current_epoch"],
        step=state["current_step"],
        skip_batches=int(pos_file.read_text()) if pos_file.is_file() else 0,
        step_starts=int(starts_file.read_text()) if starts_file.is_file() else 0,
    )


def _check_optimizer_kind(
    folder: Path, groups: list[dict[str, Any]], expected_keys: list[set[str]], optimizer_desc: str
) -> None:
    """After loading: each param group carries the hyperparameter names of this run's optimizer.

    A folder written before run_settings.json (or by another trainer) names no optimizer, and loading
    another optimizer's state succeeds; its param groups then hold the saved optimizer's hyperparameters
    (e.g. AdamW's betas and eps in SGD's groups), which fail only at the first step. torch fills in
    defaults for names added in later versions, so a name the saved groups have and this optimizer's lack,
    or the reverse, means another kind.
    """
    for group, want in zip(groups, expected_keys):
        extra, missing = sorted(set(group) - want), sorted(want - set(group))
        parts = ([f"it has {', '.join(extra)}"] if extra else []) + (
            [f"it lacks {', '.join(missing)}"] if missing else []
        )
        if parts:
            raise InputError(
                f"--resume {folder}: the saved optimizer state is another optimizer's ({'; '.join(parts)}), "
                f"not {optimizer_desc}'s; expected a state saved with the same --optimizer_type"
            )


def state_size(network: torch.nn.Module, optimizer: Any) -> int:
    """Bytes a state folder needs: the network and the optimizer's tensors (scheduler and RNG are small)."""
    n = sum(t.numel() * t.element_size() for t in network.state_dict().values())
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
    for st in inner.state.values():
        n += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))
    return n + (1 << 16)


def save_training_state(
    accelerator: Accelerator, state_dir: Path, network: torch.nn.Module, optimizer: Any,
    settings: dict[str, Any], position: tuple[int, int, int, int],
) -> Path:  # fmt: skip
    """Write the state folder whole or not at all. ``position``: (epoch, step, batches done, step starts)."""
    epoch, step, batches_in_epoch, step_starts = position

    def write(tmp: Path) -> None:
        accelerator.save_state(str(tmp))  # optimizer, scheduler, RNG (tensors and plain values only)
        if not accelerator.is_main_process:
            return
        sd = {k: v.detach().contiguous().cpu() for k, v in network.state_dict().items()}
        save_file(sd, str(tmp / NETWORK_STATE_FILE))
        saving.write_train_state(tmp, epoch, step)
        (tmp / LOOP_POSITION_FILE).write_text(str(batches_in_epoch))  # resume skips these batches
        (tmp / STEP_STARTS_FILE).write_text(str(step_starts))  # the network's dropout clock
        (tmp / SETTINGS_FILE).write_text(json.dumps(settings), encoding="utf-8")

    return atomic_dir(
        state_dir, write, size=state_size(network, optimizer), on_main=accelerator.is_main_process,
        barrier=accelerator.wait_for_everyone,
    )  # fmt: skip
