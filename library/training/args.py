"""Command-line arguments of the network trainers (sd-scripts flag names and defaults).

The parser accepts every flag an sd-scripts user passes. Flags this project implements behave as in
sd-scripts; flags it does not implement are listed in ``UNSUPPORTED`` and either stop with an error
(when ignoring them would change the result) or print one warning (when they only tune speed/memory).
Nothing is silently ignored: an unknown flag or config-file key is an error.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import toml

from library.training.step_mode import StepFacts, decide_step_mode

logger = logging.getLogger(__name__)

SAMPLERS = [
    "ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
    "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a",
]  # fmt: skip

COMPILE_MODES = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]

# flag -> (action, reason). "error": refuse when set to a non-default value; "warn": accept, one warning.
UNSUPPORTED: dict[str, tuple[str, str]] = {
    "v2": ("error", "SDXL trainer: --v2 is an SD2 flag and cannot be used with SDXL"),
    "deepspeed": ("error", "DeepSpeed is not supported; use plain DDP via accelerate"),
    "fused_backward_pass": ("error", "--fused_backward_pass is not supported for network training"),
    "validation_split": ("error", "validation is not implemented"),
    "validate_every_n_steps": ("error", "validation is not implemented"),
    "validate_every_n_epochs": ("error", "validation is not implemented"),
    "max_validation_steps": ("error", "validation is not implemented"),
    "masked_loss": ("error", "--masked_loss is not implemented"),
    "weighted_captions": ("error", "--weighted_captions is not implemented"),
    "huggingface_repo_id": ("error", "uploading to the Hugging Face Hub is not implemented"),
    "cpu_offload_checkpointing": ("error", "--cpu_offload_checkpointing is not implemented"),
    "fp8_base_unet": ("error", "--fp8_base_unet is not implemented; use --fp8_base"),
    "full_fp16": ("error", "--full_fp16 is not implemented; use --full_bf16 or --mixed_precision fp16"),
    "xformers": ("warn", "--xformers is ignored: attention uses PyTorch SDPA"),
    "mem_eff_attn": ("warn", "--mem_eff_attn is ignored: attention uses PyTorch SDPA"),
    "lowram": ("warn", "--lowram has no effect here (models load to CPU first, then move)"),
    "highvram": ("warn", "--highvram has no effect here"),
    "clip_skip": ("warn", "--clip_skip is ignored for SDXL (the penultimate layer is always used)"),
    "disable_mmap_load_safetensors": ("warn", "--disable_mmap_load_safetensors has no effect here"),
    "ddp_gradient_as_bucket_view": ("warn", "--ddp_gradient_as_bucket_view is ignored"),
    "ddp_static_graph": ("warn", "--ddp_static_graph is ignored"),
    "wandb_api_key": ("warn", "--wandb_api_key: wandb is used only if installed and logged in"),
    "debug_dataset": ("error", "--debug_dataset is not implemented"),
    "dataset_class": ("error", "--dataset_class (custom dataset classes) is not implemented"),
    "alpha_mask": ("error", "--alpha_mask (alpha-masked loss) is not implemented"),
    "initial_epoch": ("error", "--initial_epoch is not implemented; use --resume with a --save_state folder"),
    "initial_step": ("error", "--initial_step is not implemented; use --resume with a --save_state folder"),
    "skip_until_initial_step": (
        "error",
        "--skip_until_initial_step is not needed: --resume continues at the saved step",
    ),
    "log_tracker_config": ("error", "--log_tracker_config is not implemented"),
    "mem_eff_save": ("warn", "--mem_eff_save has no effect (network files are small)"),
    "persistent_data_loader_workers": (
        "warn",
        "--persistent_data_loader_workers: workers are re-created each epoch",
    ),
}


def _add(parser: argparse.ArgumentParser, name: str, **kwargs: Any) -> None:
    """Add a flag unless another module (e.g. the dataset arguments) already defined it."""
    if name in parser._option_string_actions:
        return
    parser.add_argument(name, **kwargs)


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by all network trainers (model, network, optimizer, schedule, saving, logging)."""
    for add_group in (
        _add_model_flags,
        _add_cache_flags,
        _add_network_flags,
        _add_optimizer_flags,
        _add_precision_flags,
        _add_saving_flags,
        _add_sampling_flags,
        _add_noise_and_loss_flags,
        _add_validation_flags,
        _add_logging_and_runtime_flags,
    ):
        add_group(parser)


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The base model and how it loads, the caption length, and the dataset flags sd-scripts keeps here."""
    _add(parser, "--pretrained_model_name_or_path", type=str, default=None,
         help="single-file checkpoint (.safetensors/.ckpt) or a diffusers folder")  # fmt: skip
    _add(parser, "--vae", type=str, default=None, help="VAE file or folder replacing the checkpoint's VAE")
    _add(parser, "--no_half_vae", action="store_true", help="keep the VAE in float32")
    _add(parser, "--tokenizer_cache_dir", type=str, default=None, help="folder holding the tokenizers")
    _add(parser, "--v2", action="store_true")
    _add(parser, "--v_parameterization", action="store_true", help="train v-prediction")
    _add(parser, "--lowram", action="store_true")
    _add(parser, "--highvram", action="store_true")
    _add(parser, "--clip_skip", type=int, default=None)
    _add(parser, "--sdpa", action="store_true", help="PyTorch SDPA attention (always used here)")
    _add(parser, "--xformers", action="store_true")
    _add(parser, "--mem_eff_attn", action="store_true")
    _add(parser, "--disable_mmap_load_safetensors", action="store_true")
    _add(parser, "--max_token_length", type=int, default=None, choices=[None, 150, 225])
    _add(parser, "--weighted_captions", action="store_true")
    _add(parser, "--in_json", type=str, default=None)
    _add(parser, "--masked_loss", action="store_true")
    _add(parser, "--debug_dataset", action="store_true")


def _add_cache_flags(parser: argparse.ArgumentParser) -> None:
    """Latent and text-encoder caches (the dataset arguments may define these already)."""
    _add(parser, "--cache_latents", action="store_true")
    _add(parser, "--cache_latents_to_disk", action="store_true")
    _add(parser, "--vae_batch_size", type=int, default=1)
    _add(parser, "--skip_cache_check", action="store_true")
    _add(parser, "--cache_text_encoder_outputs", action="store_true")
    _add(parser, "--cache_text_encoder_outputs_to_disk", action="store_true")


def _add_network_flags(parser: argparse.ArgumentParser) -> None:
    """The network: module, size, what it trains, where it starts, and its file."""
    _add(parser, "--network_module", type=str, default=None, help="e.g. networks.lora, networks.loha")
    _add(parser, "--network_dim", type=int, default=None, help="rank (module default when omitted)")
    _add(parser, "--network_alpha", type=float, default=1, help="alpha (default 1)")
    _add(parser, "--network_dropout", type=float, default=None)
    _add(parser, "--network_args", type=str, default=None, nargs="*", help="key=value options")
    _add(parser, "--network_weights", type=str, default=None, help="start from this network file")
    _add(parser, "--dim_from_weights", action="store_true")
    _add(parser, "--network_train_unet_only", action="store_true")
    _add(parser, "--network_train_text_encoder_only", action="store_true")
    _add(parser, "--base_weights", type=str, default=None, nargs="*")
    _add(parser, "--base_weights_multiplier", type=float, default=None, nargs="*")
    _add(parser, "--scale_weight_norms", type=float, default=None)
    _add(parser, "--loraplus_lr_ratio", type=float, default=None, help="LoRA+ up-weight LR ratio")
    _add(parser, "--loraplus_unet_lr_ratio", type=float, default=None)
    _add(parser, "--loraplus_text_encoder_lr_ratio", type=float, default=None)
    _add(parser, "--dataset_class", type=str, default=None)
    _add(parser, "--training_comment", type=str, default=None)
    _add(parser, "--no_metadata", action="store_true")
    _add(
        parser,
        "--save_model_as",
        type=str,
        default="safetensors",
        choices=[None, "ckpt", "pt", "safetensors"],
    )


def _add_optimizer_flags(parser: argparse.ArgumentParser) -> None:
    """Optimizer and learning-rate schedule."""
    _add(parser, "--optimizer_type", type=str, default="")
    _add(parser, "--use_8bit_adam", action="store_true")
    _add(parser, "--use_lion_optimizer", action="store_true")
    _add(parser, "--learning_rate", type=float, default=2.0e-6)
    _add(parser, "--unet_lr", type=float, default=None)
    _add(parser, "--text_encoder_lr", type=float, default=None, nargs="*")
    _add(parser, "--max_grad_norm", type=float, default=1.0)
    _add(parser, "--optimizer_args", type=str, default=None, nargs="*")
    _add(parser, "--fused_backward_pass", action="store_true")
    _add(parser, "--lr_scheduler", type=str, default="constant")
    _add(parser, "--lr_warmup_steps", type=str, default="0", help="int, ratio < 1 or 'N%%'")
    _add(parser, "--lr_decay_steps", type=str, default="0")
    _add(parser, "--lr_scheduler_num_cycles", type=int, default=1)
    _add(parser, "--lr_scheduler_power", type=float, default=1)
    _add(parser, "--lr_scheduler_timescale", type=int, default=None)
    _add(parser, "--lr_scheduler_min_lr_ratio", type=float, default=None)
    _add(parser, "--lr_scheduler_type", type=str, default="")
    _add(parser, "--lr_scheduler_args", type=str, default=None, nargs="*")


def _add_precision_flags(parser: argparse.ArgumentParser) -> None:
    """Precision and memory."""
    _add(parser, "--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"])
    _add(parser, "--full_fp16", action="store_true")
    _add(parser, "--full_bf16", action="store_true")
    _add(parser, "--fp8_base", action="store_true")
    _add(parser, "--fp8_base_unet", action="store_true")
    _add(
        parser,
        "--fp8_scaled",
        action="store_true",
        help="fp8 base with one scale per output channel (implies --fp8_base)",
    )
    _add(parser, "--save_precision", type=str, default=None, choices=[None, "float", "fp16", "bf16"])
    _add(parser, "--gradient_checkpointing", action="store_true")
    _add(parser, "--cpu_offload_checkpointing", action="store_true")
    _add(parser, "--gradient_accumulation_steps", type=int, default=1)


def _add_saving_flags(parser: argparse.ArgumentParser) -> None:
    """Length of the run, saving and resuming."""
    _add(parser, "--max_train_steps", type=int, default=1600)
    _add(parser, "--max_train_epochs", type=int, default=None)
    _add(parser, "--save_every_n_epochs", type=int, default=None)
    _add(parser, "--save_every_n_steps", type=int, default=None)
    _add(parser, "--save_n_epoch_ratio", type=int, default=None)
    _add(parser, "--save_last_n_epochs", type=int, default=None)
    _add(parser, "--save_last_n_epochs_state", type=int, default=None)
    _add(parser, "--save_last_n_steps", type=int, default=None)
    _add(parser, "--save_last_n_steps_state", type=int, default=None)
    _add(parser, "--save_state", action="store_true")
    _add(parser, "--save_state_on_train_end", action="store_true")
    _add(parser, "--resume", type=str, default=None)
    _add(parser, "--initial_epoch", type=int, default=None)
    _add(parser, "--initial_step", type=int, default=None)
    _add(parser, "--skip_until_initial_step", action="store_true")
    _add(parser, "--output_dir", type=str, default=None)
    _add(parser, "--output_name", type=str, default=None)
    _add(parser, "--huggingface_repo_id", type=str, default=None)
    _add(parser, "--huggingface_repo_type", type=str, default=None)
    _add(parser, "--huggingface_path_in_repo", type=str, default=None)
    _add(parser, "--huggingface_token", type=str, default=None)
    _add(parser, "--huggingface_repo_visibility", type=str, default=None)
    _add(parser, "--save_state_to_huggingface", action="store_true")
    _add(parser, "--resume_from_huggingface", action="store_true")
    _add(parser, "--async_upload", action="store_true")


def _add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """Sample images during training."""
    _add(parser, "--sample_prompts", type=str, default=None)
    _add(parser, "--sample_every_n_steps", type=int, default=None)
    _add(parser, "--sample_every_n_epochs", type=int, default=None)
    _add(parser, "--sample_at_first", action="store_true")
    _add(parser, "--sample_sampler", type=str, default="ddim", choices=SAMPLERS)


def _add_noise_and_loss_flags(parser: argparse.ArgumentParser) -> None:
    """Noise and loss (epsilon/v-prediction training)."""
    _add(parser, "--noise_offset", type=float, default=None)
    _add(parser, "--noise_offset_random_strength", action="store_true")
    _add(parser, "--adaptive_noise_scale", type=float, default=None)
    _add(parser, "--multires_noise_iterations", type=int, default=None)
    _add(parser, "--multires_noise_discount", type=float, default=0.3)
    _add(parser, "--ip_noise_gamma", type=float, default=None)
    _add(parser, "--ip_noise_gamma_random_strength", action="store_true")
    _add(parser, "--min_snr_gamma", type=float, default=None)
    _add(parser, "--debiased_estimation_loss", action="store_true")
    _add(parser, "--scale_v_pred_loss_like_noise_pred", action="store_true")
    _add(parser, "--v_pred_like_loss", type=float, default=None)
    _add(parser, "--zero_terminal_snr", action="store_true")
    _add(parser, "--min_timestep", type=int, default=None)
    _add(parser, "--max_timestep", type=int, default=None)
    _add(parser, "--loss_type", type=str, default="l2", choices=["l1", "l2", "huber", "smooth_l1"])
    _add(parser, "--huber_schedule", type=str, default="snr", choices=["constant", "exponential", "snr"])
    _add(parser, "--huber_c", type=float, default=0.1)
    _add(parser, "--huber_scale", type=float, default=1.0)


def _add_validation_flags(parser: argparse.ArgumentParser) -> None:
    """Validation: accepted names, refused when used."""
    _add(parser, "--validation_split", type=float, default=0.0)
    _add(parser, "--validation_seed", type=int, default=None)
    _add(parser, "--validate_every_n_steps", type=int, default=None)
    _add(parser, "--validate_every_n_epochs", type=int, default=None)
    _add(parser, "--max_validation_steps", type=int, default=None)


def _add_logging_and_runtime_flags(parser: argparse.ArgumentParser) -> None:
    """Logging, compilation, distributed runs, metadata and config files."""
    _add(parser, "--seed", type=int, default=None)
    _add(parser, "--logging_dir", type=str, default=None)
    _add(parser, "--log_with", type=str, default=None, choices=["tensorboard", "wandb", "all"])
    _add(parser, "--log_prefix", type=str, default=None)
    _add(parser, "--log_tracker_name", type=str, default=None)
    _add(parser, "--log_tracker_config", type=str, default=None)
    _add(parser, "--wandb_run_name", type=str, default=None)
    _add(parser, "--wandb_api_key", type=str, default=None)
    _add(parser, "--log_config", action="store_true")
    _add(parser, "--deepspeed", action="store_true")
    _add(parser, "--torch_compile", action="store_true",
         help="torch.compile each repeated transformer block (adapters compiled in)")  # fmt: skip
    _add(parser, "--dynamo_backend", type=str, default="inductor", help="torch.compile backend")
    _add(parser, "--compile_mode", type=str, default=None, choices=COMPILE_MODES,
         help="torch.compile mode (default: torch's default)")  # fmt: skip
    _add(parser, "--cuda_graph", action="store_true",
         help="require the CUDA-graph step (the default on CUDA): a conflicting option is an error, "
              "not a fall-back to the eager step")  # fmt: skip
    _add(parser, "--no_cuda_graph", action="store_true",
         help="run the eager step instead of replaying the U-Net/DiT forward and backward as CUDA graphs")  # fmt: skip
    _add(parser, "--ddp_timeout", type=int, default=None)
    _add(parser, "--ddp_gradient_as_bucket_view", action="store_true")
    _add(parser, "--ddp_static_graph", action="store_true")
    _add(parser, "--mem_eff_save", action="store_true")
    for key in ("title", "author", "description", "license", "tags"):
        _add(parser, f"--metadata_{key}", type=str, default=None)
    _add(parser, "--config_file", type=str, default=None, help="TOML file of flags (CLI beats file)")
    _add(parser, "--output_config", action="store_true", help="write the non-default args to --config_file")


def read_config_file(
    parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]
) -> argparse.Namespace:
    """Apply ``--config_file``: its keys (top level or one table deep) sit between CLI flags and defaults."""
    if not args.config_file:
        return args
    path = Path(args.config_file)
    if path.suffix != ".toml" and not path.exists():
        path = path.with_name(path.name + ".toml")
    if args.output_config:
        return args  # handled by write_config_file
    if not path.is_file():
        raise FileNotFoundError(f"--config_file: {path} does not exist (expected a TOML file of flags)")
    try:
        data = toml.loads(Path(path).read_text(encoding="utf-8-sig"))  # a BOM would glue to the first key
    except (toml.TomlDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--config_file {path}: not valid TOML ({e})") from e
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):  # sections like [model] / [training] only group flags
            flat.update(value)
        else:
            flat[key] = value
    actions = {a.dest: a for a in parser._actions}
    unknown = sorted(k for k in flat if k not in actions)
    if unknown:
        raise ValueError(
            f"--config_file {path}: unknown keys {unknown} (each key must be a trainer flag name)"
        )
    # the same conversion and choices as the command line (argparse leaves namespace values alone)
    namespace = argparse.Namespace(**{k: _config_value(actions[k], v, path) for k, v in flat.items()})
    return parser.parse_args(list(argv), namespace=namespace)


_EXPECTED = {int: "an integer", float: "a number", str: "a string"}


def _config_value(action: argparse.Action, value: Any, path: Path) -> Any:
    """One ``--config_file`` value, converted as argparse would convert the same flag's text."""
    where = f"--config_file {path}: {action.dest} = {value!r}"
    if action.nargs == 0:  # store_true / store_false / store_const
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false")
        return value
    if action.nargs in ("*", "+") or isinstance(action.nargs, int):
        return [_config_scalar(action, v, where) for v in (value if isinstance(value, list) else [value])]
    if isinstance(value, list):
        raise ValueError(f"{where}: expected one value, not a list")
    return _config_scalar(action, value, where)


def _config_scalar(action: argparse.Action, value: Any, where: str) -> Any:
    convert = action.type or str
    expected = _EXPECTED.get(convert, f"a value --{action.dest} accepts")  # type: ignore[call-overload]
    if isinstance(value, (dict, list)) or (isinstance(value, bool) and convert is not str):
        raise ValueError(f"{where}: expected {expected}")
    try:
        out = convert(value if isinstance(value, str) else str(value))
    except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
        raise ValueError(f"{where}: expected {expected}") from e
    if action.choices is not None and out not in action.choices:
        raise ValueError(f"{where}: expected one of {[c for c in action.choices if c is not None]}")
    return out


def write_config_file(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    """``--output_config``: dump args that differ from the defaults to ``--config_file``."""
    path = Path(args.config_file)
    if path.suffix != ".toml":
        path = path.with_name(path.name + ".toml")
    skip = {"config_file", "output_config"}
    out = {}
    for action in parser._actions:
        dest = action.dest
        if dest in skip or dest == "help":
            continue
        value = getattr(args, dest, None)
        if value is not None and value != action.default:
            out[dest] = value
    path.write_text(toml.dumps(out), encoding="utf-8")
    return path


def parse_warmup_steps(value: str | int | float | None, max_train_steps: int) -> int:
    """``--lr_warmup_steps``: an integer, a float ratio < 1 of the total steps, or ``"N%"``."""
    if value is None:
        return 0
    text = str(value).strip()
    try:
        if text.endswith("%"):
            return int(max_train_steps * float(text[:-1]) / 100)
        number = float(text)
    except ValueError as e:
        raise ValueError(
            f"--lr_warmup_steps / --lr_decay_steps: {value!r} is not an int, a ratio or 'N%'"
        ) from e
    if number < 1 and "." in text:
        return int(max_train_steps * number)
    if number != math.floor(number) or number < 0:
        raise ValueError(f"--lr_warmup_steps / --lr_decay_steps: {value!r} must be a non-negative integer")
    return int(number)


def verify_training_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Check combinations, apply implications, refuse/warn on unsupported flags."""
    defaults = {a.dest: a.default for a in parser._actions}
    for name, (kind, reason) in UNSUPPORTED.items():
        if not hasattr(args, name):
            continue
        value = getattr(args, name)
        if value == defaults.get(name) or value is None or value is False:
            continue
        if kind == "error":
            raise ValueError(f"--{name}: {reason}")
        logger.warning("--%s: %s", name, reason)
    for name in (
        "huggingface_repo_id",
        "save_state_to_huggingface",
        "resume_from_huggingface",
        "async_upload",
    ):
        if getattr(args, name, None):
            raise ValueError(f"--{name}: uploading/downloading via the Hugging Face Hub is not implemented")
    if not args.pretrained_model_name_or_path:
        raise ValueError(
            "--pretrained_model_name_or_path is required (an SDXL .safetensors file or diffusers folder)"
        )
    if not args.network_module:
        raise ValueError("--network_module is required (e.g. networks.lora, networks.loha, networks.lokr)")
    if not args.output_dir:
        raise ValueError("--output_dir is required (the folder that receives the trained network)")
    if args.network_train_unet_only and args.network_train_text_encoder_only:
        raise ValueError("--network_train_unet_only and --network_train_text_encoder_only cannot both be set")
    if args.cache_latents_to_disk:
        args.cache_latents = True
    if args.cache_text_encoder_outputs_to_disk:
        args.cache_text_encoder_outputs = True
    if args.cache_text_encoder_outputs and not args.network_train_unet_only:
        raise ValueError(
            "--cache_text_encoder_outputs requires --network_train_unet_only (the TEs are not trained)"
        )
    if getattr(args, "fp8_scaled", False):
        args.fp8_base = True  # as in sd-scripts, --fp8_scaled alone asks for an fp8 base
    if args.fp8_base and args.mixed_precision == "no":
        raise ValueError(
            "--fp8_base needs --mixed_precision fp16 or bf16 (fp8 weights are upcast by autocast)"
        )
    if args.full_bf16 and args.mixed_precision != "bf16":
        raise ValueError("--full_bf16 requires --mixed_precision bf16")
    if args.gradient_accumulation_steps < 1:
        raise ValueError(
            f"--gradient_accumulation_steps must be >= 1, got {args.gradient_accumulation_steps}"
        )
    if args.max_train_steps is not None and args.max_train_steps < 1 and args.max_train_epochs is None:
        raise ValueError(f"--max_train_steps must be >= 1, got {args.max_train_steps}")
    if args.base_weights_multiplier and (
        not args.base_weights or len(args.base_weights_multiplier) != len(args.base_weights)
    ):
        raise ValueError("--base_weights_multiplier needs one value per --base_weights file")
    if args.dim_from_weights and not args.network_weights:
        raise ValueError("--dim_from_weights requires --network_weights")
    if args.network_weights and not Path(args.network_weights).exists():
        raise FileNotFoundError(f"--network_weights: {args.network_weights} does not exist")
    for path in args.base_weights or []:
        if not Path(path).exists():
            raise FileNotFoundError(f"--base_weights: {path} does not exist")
    _check_input_files(args)
    _check_output_name(args)
    if args.network_alpha is not None and args.network_alpha < 0:
        logger.warning(
            "--network_alpha %s is negative: the scale alpha/dim flips the sign of every ΔW; "
            "training works, but use a positive alpha unless that is meant",
            args.network_alpha,
        )
    if args.resume and not Path(args.resume).is_dir():
        raise FileNotFoundError(f"--resume: {args.resume} is not a state folder (written by --save_state)")
    if args.sample_prompts and not Path(args.sample_prompts).is_file():
        raise FileNotFoundError(f"--sample_prompts: {args.sample_prompts} does not exist")
    if args.network_args:
        for token in args.network_args:
            if "=" not in token:
                raise ValueError(f"--network_args: {token!r} is not key=value")
    if args.optimizer_args:
        for token in args.optimizer_args:
            if token.count("=") != 1:
                raise ValueError(f"--optimizer_args: {token!r} must be key=value with exactly one '='")
    _verify_compile_args(args)
    _verify_cuda_graph_args(args)
    if args.logging_dir and not args.log_with:
        args.log_with = "tensorboard"  # sd-scripts: a logging dir implies TensorBoard
    if args.log_with in ("tensorboard", "all") and not args.logging_dir:
        raise ValueError("--log_with tensorboard needs --logging_dir (where the event files go)")


def _check_input_files(args: argparse.Namespace) -> None:
    """Unreadable, cut or pickled model/network files are named now, before any model is loaded."""
    from networks.tensor_files import check_tensor_file, check_weight_folder

    network = "a .safetensors network file"
    for flag, path, expected in [("--network_weights", args.network_weights, network)] + [
        ("--base_weights", p, network) for p in args.base_weights or []
    ]:
        if path:
            check_tensor_file(path, flag, expected=expected)
    for flag in ("pretrained_model_name_or_path", "vae"):
        path = Path(getattr(args, flag) or "")
        if not str(path) or str(path) == ".":
            continue
        if path.is_file():
            check_tensor_file(path, f"--{flag}", expected="a .safetensors model file")
        elif path.is_dir():
            for sub in ("", "unet", "vae", "text_encoder", "text_encoder_2"):
                if (path / sub).is_dir():
                    check_weight_folder(path / sub, f"--{flag}")


def _check_output_name(args: argparse.Namespace) -> None:
    """Saved files stay directly inside --output_dir: a name with a folder part is refused."""
    name = args.output_name
    if name and (Path(name).name != name or name in (".", "..") or "\\" in name):
        raise ValueError(
            f"--output_name {name!r}: expected a plain file name without folders or '..' "
            f"(files are written directly inside --output_dir {args.output_dir})"
        )


def _verify_cuda_graph_args(args: argparse.Namespace) -> None:
    """An explicit --cuda_graph's conflicts that the arguments alone show, before any model loads.

    The run decides the step mode once it knows the device and the network (`library.training.step_mode`);
    without --cuda_graph a conflict only means the eager step, so nothing is checked here.
    """
    if getattr(args, "cuda_graph", False):
        decide_step_mode(StepFacts.from_args(args))


def _verify_compile_args(args: argparse.Namespace) -> None:
    """--dynamo_backend / --compile_mode only mean something with --torch_compile; the backend must exist."""
    if not getattr(args, "torch_compile", False):
        if getattr(args, "compile_mode", None):
            raise ValueError("--compile_mode needs --torch_compile")
        return
    import torch._dynamo

    # sd-scripts takes accelerate's upper-case names (e.g. INDUCTOR); torch's registry is lower-case
    args.dynamo_backend = (args.dynamo_backend or "inductor").lower()
    known = torch._dynamo.list_backends(exclude_tags=())
    if args.dynamo_backend not in known:
        raise ValueError(
            f"--dynamo_backend {args.dynamo_backend!r}: not a torch.compile backend; expected one of {known}"
        )
    if getattr(args, "compile_mode", None) not in (None, "default") and args.dynamo_backend != "inductor":
        raise ValueError(
            f"--compile_mode is an inductor option; --dynamo_backend {args.dynamo_backend} does not use it"
        )
    if getattr(args, "compile_mode", None) in ("reduce-overhead", "max-autotune") and getattr(
        args, "gradient_checkpointing", False
    ):
        # measured on an H100 (torch 2.11): cudagraph trees fail on the blocks that checkpointing recomputes
        # ("accessing tensor output of CUDAGraphs that has been overwritten")
        raise ValueError(
            f"--compile_mode {args.compile_mode} uses CUDA graphs, which cannot replay blocks recomputed by "
            "--gradient_checkpointing; use --compile_mode max-autotune-no-cudagraphs or drop --gradient_checkpointing"
        )


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv`` (None = sys.argv), apply ``--config_file`` and verify."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.output_config:
        if not args.config_file:
            raise ValueError("--output_config needs --config_file (the file to write)")
        return args
    args = read_config_file(parser, args, argv)
    verify_training_args(args, parser)
    return args
