"""Optimizers and learning-rate schedulers selected by sd-scripts' flag names.

``--optimizer_type`` is case-insensitive; a dotted path names any optimizer class; a bare unknown
name is looked up in ``torch.optim``. ``--optimizer_args`` tokens are ``key=value`` with Python-literal
values. Schedulers come from transformers' ``get_scheduler`` (plus the Adafactor schedule).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from library.training import flat_8bit
from library.training.args import parse_warmup_steps

logger = logging.getLogger(__name__)


def parse_optimizer_args(tokens: Iterable[str] | None) -> dict[str, Any]:
    """``["weight_decay=0.01", "betas=0.9,0.999"]`` -> ``{"weight_decay": 0.01, "betas": (0.9, 0.999)}``."""
    kwargs: dict[str, Any] = {}
    for token in tokens or []:
        if token.count("=") != 1:
            raise ValueError(f"--optimizer_args: {token!r} must be key=value with exactly one '='")
        key, value = (part.strip() for part in token.split("="))
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            if "," in value:  # e.g. betas=0.9,0.999 written without parentheses
                kwargs[key] = tuple(ast.literal_eval(v) for v in value.split(","))
            else:
                kwargs[key] = value  # a bare word such as decouple=True is handled above; keep strings as is
    return kwargs


def _bnb(name: str) -> Any:
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError(f"--optimizer_type {name} needs bitsandbytes: pip install bitsandbytes") from e
    return bnb


def _import_class(path: str) -> type:
    module_name, _, class_name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"--optimizer_type {path}: cannot import module {module_name!r} ({e})") from e
    if not hasattr(module, class_name):
        raise ValueError(f"--optimizer_type {path}: module {module_name!r} has no class {class_name!r}")
    return getattr(module, class_name)


def _resolve_optimizer_class(args: argparse.Namespace) -> tuple[str, type]:
    """Map the flags to (display name, optimizer class)."""
    name = args.optimizer_type or ""
    if not name:
        if args.use_8bit_adam:
            name = "AdamW8bit"
        elif args.use_lion_optimizer:
            name = "Lion"
        else:
            name = "AdamW"
    elif args.use_8bit_adam or args.use_lion_optimizer:
        raise ValueError("--optimizer_type cannot be combined with --use_8bit_adam / --use_lion_optimizer")
    low = name.lower()
    if low == "adamw":
        return "AdamW", torch.optim.AdamW
    if low == "sgdnesterov":
        return "SGDNesterov", torch.optim.SGD
    if low in ("adamw8bit", "pagedadamw8bit", "pagedadamw", "pagedadamw32bit", "lion8bit", "pagedlion8bit",
               "sgdnesterov8bit"):  # fmt: skip
        bnb = _bnb(name)
        table = {
            "adamw8bit": "AdamW8bit", "pagedadamw8bit": "PagedAdamW8bit", "pagedadamw": "PagedAdamW",
            "pagedadamw32bit": "PagedAdamW32bit", "lion8bit": "Lion8bit", "pagedlion8bit": "PagedLion8bit",
            "sgdnesterov8bit": "SGD8bit",
        }  # fmt: skip
        return name, getattr(bnb.optim, table[low])
    if low == "lion":
        try:
            return "Lion", _import_class("lion_pytorch.Lion")
        except ImportError:
            return "Lion", _bnb(name).optim.Lion  # bitsandbytes' 32-bit Lion is the same update rule
    if low == "adafactor":
        from transformers.optimization import Adafactor

        return "Adafactor", Adafactor
    if low == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError as e:
            raise ImportError("--optimizer_type Prodigy needs prodigyopt: pip install prodigyopt") from e
        return "Prodigy", Prodigy
    if low.startswith("dadapt"):
        cls_name = {"dadaptation": "DAdaptAdam", "dadaptadampreprint": "DAdaptAdam"}.get(low)
        try:
            module = importlib.import_module("dadaptation")
        except ImportError as e:
            raise ImportError(f"--optimizer_type {name} needs dadaptation: pip install dadaptation") from e
        wanted = cls_name or next((c for c in dir(module) if c.lower() == low), None)
        if wanted is None or not hasattr(module, wanted):
            raise ValueError(f"--optimizer_type {name}: not found in the dadaptation package")
        return name, getattr(module, wanted)
    if low.endswith("schedulefree"):
        try:
            module = importlib.import_module("schedulefree")
        except ImportError as e:
            raise ImportError(f"--optimizer_type {name} needs schedulefree: pip install schedulefree") from e
        wanted = next((c for c in dir(module) if c.lower() == low), None)
        if wanted is None:
            raise ValueError(f"--optimizer_type {name}: not found in the schedulefree package")
        return name, getattr(module, wanted)
    if "." in name:
        return name, _import_class(name)
    if hasattr(torch.optim, name):
        return name, getattr(torch.optim, name)
    raise ValueError(
        f"--optimizer_type {name!r}: unknown. Use AdamW, AdamW8bit, Lion, Lion8bit, SGDNesterov, Adafactor, "
        "Prodigy, a torch.optim class name or a dotted class path"
    )


def optimizer_class_name(args: argparse.Namespace) -> str:
    """``module.Class`` of the optimizer the flags select (imported, not built): a state records it."""
    _, cls = _resolve_optimizer_class(args)
    return f"{cls.__module__}.{cls.__name__}"


def build_optimizer(
    args: argparse.Namespace, params: list[dict[str, Any]] | Iterable[torch.nn.Parameter]
) -> tuple[str, str, torch.optim.Optimizer]:
    """Create the optimizer. Returns (name, ``module.Class(k=v,...)`` description, optimizer)."""
    name, cls = _resolve_optimizer_class(args)
    kwargs = parse_optimizer_args(args.optimizer_args)
    lr = args.learning_rate
    low = name.lower()
    if low in ("sgdnesterov", "sgdnesterov8bit"):
        kwargs.setdefault("momentum", 0.9)
        kwargs.setdefault("nesterov", True)
        if not kwargs["momentum"]:
            raise ValueError("--optimizer_type SGDNesterov needs a non-zero momentum")
    if low == "adafactor":
        kwargs.setdefault("scale_parameter", True)
        kwargs.setdefault("relative_step", True)
        kwargs.setdefault("warmup_init", False)
        if kwargs["relative_step"]:
            # Adafactor computes its own step size; group lrs are dropped (sd-scripts behaviour)
            lr = None
            if isinstance(params, list):
                for group in params:
                    if isinstance(group, dict):
                        group.pop("lr", None)
            if args.lr_scheduler != "adafactor":
                logger.warning("Adafactor with relative_step=True: --lr_scheduler is set to adafactor")
                args.lr_scheduler = f"adafactor:{args.learning_rate}"
    # bitsandbytes' optimizers get the flat update mixed in (laid out by flat_8bit.flatten_optimizer once
    # the network is on its device); the description keeps bitsandbytes' class, as saved states record it
    built = flat_8bit.flat_class(cls) if flat_8bit.switched_on() and flat_8bit.flat_capable(cls) else cls
    try:
        optimizer = built(params, lr=lr, **kwargs) if lr is not None else built(params, **kwargs)
    except TypeError as e:
        raise ValueError(
            f"--optimizer_args {args.optimizer_args}: not accepted by {cls.__name__} ({e})"
        ) from e
    desc_args = ",".join(f"{k}={v}" for k, v in kwargs.items())
    description = f"{cls.__module__}.{cls.__name__}" + (f"({desc_args})" if desc_args else "")
    return name, description, optimizer


def build_scheduler(
    args: argparse.Namespace, optimizer: torch.optim.Optimizer, num_processes: int = 1
) -> LRScheduler:
    """``--lr_scheduler`` with warmup; length = max_train_steps × processes (accelerate steps per process)."""
    from transformers.optimization import SchedulerType, get_scheduler

    total = args.max_train_steps * num_processes
    warmup = parse_warmup_steps(args.lr_warmup_steps, args.max_train_steps) * num_processes
    name = args.lr_scheduler
    kwargs = parse_optimizer_args(args.lr_scheduler_args)
    if args.lr_scheduler_type:
        cls = _import_class(args.lr_scheduler_type)
        return cls(optimizer, **kwargs)
    if name.startswith("adafactor"):
        from transformers.optimization import AdafactorSchedule

        initial = float(name.split(":", 1)[1]) if ":" in name else args.learning_rate
        return AdafactorSchedule(optimizer, initial_lr=initial)
    if name == "piecewise_constant":
        raise ValueError(
            "--lr_scheduler piecewise_constant needs --lr_scheduler_args; use --lr_scheduler_type"
        )
    valid = [s.value for s in SchedulerType]
    if name not in valid:
        raise ValueError(f"--lr_scheduler {name!r}: unknown; expected one of {valid}")
    if name == "constant":
        if warmup:
            logger.warning(
                "--lr_warmup_steps is ignored by --lr_scheduler constant (use constant_with_warmup)"
            )
        return LambdaLR(optimizer, lambda _step: 1.0)
    specific: dict[str, Any] = dict(kwargs)
    used = {"lr_scheduler_timescale": name == "inverse_sqrt",
            "lr_scheduler_min_lr_ratio": name in ("cosine_with_min_lr", "warmup_stable_decay"),
            "lr_decay_steps": name == "warmup_stable_decay"}  # fmt: skip
    for flag, ok in used.items():
        value = getattr(args, flag, None)
        if value not in (None, "0", 0) and not ok:
            logger.warning("--%s is not used by --lr_scheduler %s", flag, name)
    if name == "inverse_sqrt" and args.lr_scheduler_timescale is not None:
        specific.setdefault("timescale", args.lr_scheduler_timescale)
    if name == "cosine_with_min_lr":
        specific.setdefault("min_lr_rate", args.lr_scheduler_min_lr_ratio or 0.0)
    if name == "warmup_stable_decay":
        specific.setdefault(
            "num_decay_steps", parse_warmup_steps(args.lr_decay_steps, args.max_train_steps) * num_processes
        )
        specific.setdefault("min_lr_ratio", args.lr_scheduler_min_lr_ratio or 0.0)
    if name == "cosine_with_restarts":
        specific.setdefault("num_cycles", args.lr_scheduler_num_cycles)
    if name == "polynomial":
        specific.setdefault("power", args.lr_scheduler_power)
    if name in ("constant_with_warmup", "inverse_sqrt"):
        return get_scheduler(
            name, optimizer, num_warmup_steps=warmup, scheduler_specific_kwargs=specific or None
        )
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=total,
        scheduler_specific_kwargs=specific or None,
    )
