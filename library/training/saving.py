"""Saving: atomic writes, sd-scripts file names, ``ss_*`` metadata, ModelSpec keys, model hashes, states."""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from library.io.atomic_io import atomic_write  # noqa: F401  (re-exported: trainers call saving.atomic_write)

MODELSPEC_VERSION = "1.0.1"
IMPLEMENTATION_SGM = "https://github.com/Stability-AI/generative-models"
IMPLEMENTATION_VERSION = "lohakr-trainer/0.1.0"
TRAIN_STATE_FILE = "train_state.json"


# ----------------------------------------------------------------------------------------- atomic writes
def check_output_dir_writable(output_dir: str | Path) -> Path:
    """Create ``output_dir`` and prove a file can be written there, before any training work."""
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermissionError(f"--output_dir {out}: not writable ({e.strerror or e})") from e
    return out


# ----------------------------------------------------------------------------------------- file names
def model_file_name(
    output_name: str | None, ext: str, *, epoch: int | None = None, step: int | None = None
) -> str:
    """sd-scripts names: final ``<name|last>``, epoch ``<name|epoch>-%06d``, step ``<name|at>-step%08d``."""
    if epoch is not None:
        return f"{output_name or 'epoch'}-{epoch:06d}.{ext}"
    if step is not None:
        return f"{output_name or 'at'}-step{step:08d}.{ext}"
    return f"{output_name or 'last'}.{ext}"


def state_dir_name(output_name: str | None, *, epoch: int | None = None, step: int | None = None) -> str:
    """State folders: ``<name>-%06d-state``, ``<name>-step%08d-state``, ``<name>-state`` (final)."""
    if epoch is not None:
        return f"{output_name or 'epoch'}-{epoch:06d}-state"
    if step is not None:
        return f"{output_name or 'at'}-step{step:08d}-state"
    return f"{output_name or 'last'}-state"


def remove_path(path: str | Path) -> None:
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def write_train_state(state_dir: str | Path, epoch: int, step: int) -> None:
    """``train_state.json`` {current_epoch, current_step} beside accelerate's state files."""
    target = Path(state_dir) / TRAIN_STATE_FILE
    text = json.dumps({"current_epoch": epoch, "current_step": step})
    atomic_write(target, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_train_state(state_dir: str | Path) -> dict[str, int]:
    path = Path(state_dir) / TRAIN_STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"--resume {state_dir}: {TRAIN_STATE_FILE} missing (not a --save_state folder)"
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    return {"current_epoch": int(data["current_epoch"]), "current_step": int(data["current_step"])}


# ----------------------------------------------------------------------------------------- hashes
def legacy_model_hash(path: str | Path) -> str:
    """sd-scripts' short hash: first 8 hex of SHA-256 over the 64 KiB at offset 1 MiB."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def full_model_hash(path: str | Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


# ----------------------------------------------------------------------------------------- metadata
def build_modelspec(
    args: argparse.Namespace,
    architecture: str,
    training_started_at: float,
    implementation: str = IMPLEMENTATION_SGM,
) -> dict[str, str]:
    """ModelSpec 1.0.1 keys for a LoRA-type network (``architecture`` e.g. ``stable-diffusion-xl-v1-base``)."""
    title = args.metadata_title or args.output_name or f"LoRA@{int(training_started_at)}"
    resolution = "1024x1024"
    res = getattr(args, "resolution", None)
    if res:
        parts = [int(v) for v in str(res).replace("(", "").replace(")", "").split(",") if v.strip()]
        if len(parts) == 1:
            parts = parts * 2
        resolution = f"{parts[0]}x{parts[1]}"
    date = datetime.datetime.fromtimestamp(training_started_at).replace(microsecond=0).isoformat()
    spec = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.resolution": resolution,
        "modelspec.date": date,
        "modelspec.prediction_type": "v" if getattr(args, "v_parameterization", False) else "epsilon",
        "modelspec.implementation_version": IMPLEMENTATION_VERSION,
    }
    if args.min_timestep is not None or args.max_timestep is not None:
        low = 0 if args.min_timestep is None else args.min_timestep
        high = 1000 if args.max_timestep is None else args.max_timestep
        spec["modelspec.timestep_range"] = f"{low},{high}"
    for key in ("author", "description", "license", "tags"):
        value = getattr(args, f"metadata_{key}", None)
        if value:
            spec[f"modelspec.{key}"] = value
    return spec


def training_metadata(
    args: argparse.Namespace,
    *,
    session_id: int,
    training_started_at: float,
    base_model_version: str,
    optimizer_desc: str,
    num_train_images: int,
    num_reg_images: int,
    num_batches_per_epoch: int,
    num_epochs: int,
    network_args: dict[str, str] | None,
    dataset_metadata: dict[str, str] | None,
) -> dict[str, str]:
    """The run-wide ``ss_*`` keys, named and formatted as sd-scripts writes them so that tools reading its
    files read ours; per-save keys are added by :func:`finalize_metadata`."""
    a = args
    md: dict[str, Any] = {
        "ss_session_id": session_id,
        "ss_training_started_at": training_started_at,
        "ss_output_name": a.output_name,
        "ss_learning_rate": a.learning_rate,
        "ss_text_encoder_lr": a.text_encoder_lr,
        "ss_unet_lr": a.unet_lr,
        "ss_num_train_images": num_train_images,
        "ss_num_validation_images": 0,
        "ss_num_reg_images": num_reg_images,
        "ss_num_batches_per_epoch": num_batches_per_epoch,
        "ss_num_epochs": num_epochs,
        "ss_gradient_checkpointing": a.gradient_checkpointing,
        "ss_gradient_accumulation_steps": a.gradient_accumulation_steps,
        "ss_max_train_steps": a.max_train_steps,
        "ss_lr_warmup_steps": a.lr_warmup_steps,
        "ss_lr_scheduler": a.lr_scheduler,
        "ss_network_module": a.network_module,
        "ss_network_dim": a.network_dim,
        "ss_network_alpha": a.network_alpha,
        "ss_network_dropout": a.network_dropout,
        "ss_mixed_precision": a.mixed_precision,
        "ss_full_fp16": a.full_fp16,
        "ss_v2": False,
        "ss_base_model_version": base_model_version,
        "ss_clip_skip": a.clip_skip,
        "ss_max_token_length": a.max_token_length,
        "ss_cache_latents": a.cache_latents,
        "ss_seed": a.seed,
        "ss_lowram": a.lowram,
        "ss_noise_offset": a.noise_offset,
        "ss_multires_noise_iterations": a.multires_noise_iterations,
        "ss_multires_noise_discount": a.multires_noise_discount,
        "ss_adaptive_noise_scale": a.adaptive_noise_scale,
        "ss_zero_terminal_snr": a.zero_terminal_snr,
        "ss_training_comment": a.training_comment,
        "ss_sd_scripts_commit_hash": IMPLEMENTATION_VERSION,
        "ss_optimizer": optimizer_desc,
        "ss_max_grad_norm": a.max_grad_norm,
        "ss_caption_dropout_rate": getattr(a, "caption_dropout_rate", None),
        "ss_caption_dropout_every_n_epochs": getattr(a, "caption_dropout_every_n_epochs", None),
        "ss_caption_tag_dropout_rate": getattr(a, "caption_tag_dropout_rate", None),
        "ss_face_crop_aug_range": getattr(a, "face_crop_aug_range", None),
        "ss_prior_loss_weight": getattr(a, "prior_loss_weight", None),
        "ss_min_snr_gamma": a.min_snr_gamma,
        "ss_scale_weight_norms": a.scale_weight_norms,
        "ss_ip_noise_gamma": a.ip_noise_gamma,
        "ss_debiased_estimation": a.debiased_estimation_loss,
        "ss_noise_offset_random_strength": a.noise_offset_random_strength,
        "ss_ip_noise_gamma_random_strength": a.ip_noise_gamma_random_strength,
        "ss_loss_type": a.loss_type,
        "ss_huber_schedule": a.huber_schedule,
        "ss_huber_scale": a.huber_scale,
        "ss_huber_c": a.huber_c,
        "ss_fp8_base": a.fp8_base,
        "ss_fp8_base_unet": a.fp8_base_unet,
        "ss_validation_seed": a.validation_seed,
        "ss_validation_split": a.validation_split,
        "ss_max_validation_steps": a.max_validation_steps,
        "ss_validate_every_n_epochs": a.validate_every_n_epochs,
        "ss_validate_every_n_steps": a.validate_every_n_steps,
        "ss_resize_interpolation": getattr(a, "resize_interpolation", None),
    }
    if network_args:
        md["ss_network_args"] = json.dumps(network_args)
    if dataset_metadata:
        md.update(dataset_metadata)
    model = a.pretrained_model_name_or_path
    md["ss_sd_model_name"] = os.path.basename(model.rstrip("/\\")) if os.path.exists(model) else model
    if os.path.isfile(model):
        md["ss_sd_model_hash"] = legacy_model_hash(model)
        md["ss_new_sd_model_hash"] = full_model_hash(model)
    if a.vae:
        md["ss_vae_name"] = os.path.basename(a.vae.rstrip("/\\"))
        if os.path.isfile(a.vae):
            md["ss_vae_hash"] = legacy_model_hash(a.vae)
            md["ss_new_vae_hash"] = full_model_hash(a.vae)
    if a.no_metadata:  # keep only what tools need to load the file
        keep = {"ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args", "ss_sd_model_hash", "ss_new_sd_model_hash", "ss_vae_hash", "ss_new_vae_hash"}  # fmt: skip
        md = {k: v for k, v in md.items() if k in keep}
    return {k: str(v) for k, v in md.items()}


def finalize_metadata(
    base: dict[str, str], modelspec: dict[str, str], *, steps: int, epoch: int, no_metadata: bool
) -> dict[str, str]:
    """Per-save keys: ``ss_training_finished_at``, ``ss_steps``, ``ss_epoch`` plus the ModelSpec keys."""
    md = dict(base)
    if not no_metadata:
        md["ss_training_finished_at"] = str(time.time())
        md["ss_steps"] = str(steps)
        md["ss_epoch"] = str(epoch)
    md.update(modelspec)
    return md
