"""sd-scripts dataset config: TOML/JSON schema, validation, precedence, CLI flags.

Precedence for every field: subset -> dataset -> [general] -> CLI value (argparse, defaults included)
-> built-in default. Unknown keys stop with one error naming the key and the table.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import toml

logger = logging.getLogger(__name__)

# ---- schema: key -> (type tag, default). Types: bool, int, float, str, reso, range, dict, num_or_none
SUBSET_KEYS: dict[str, tuple[str, Any]] = {
    "num_repeats": ("int", 1),
    "shuffle_caption": ("bool", False),
    "keep_tokens": ("int", 0),
    "keep_tokens_separator": ("str", None),
    "secondary_separator": ("str", None),
    "caption_separator": ("str", ","),
    "enable_wildcard": ("bool", False),
    "color_aug": ("bool", False),
    "flip_aug": ("bool", False),
    "face_crop_aug_range": ("range", None),
    "random_crop": ("bool", False),
    "caption_prefix": ("str", None),
    "caption_suffix": ("str", None),
    "token_warmup_min": ("int", 1),
    "token_warmup_step": ("float", 0.0),
    "custom_attributes": ("dict", None),
    "resize_interpolation": ("str", None),
    "caption_dropout_rate": ("float", 0.0),
    "caption_dropout_every_n_epochs": ("int", 0),
    "caption_tag_dropout_rate": ("float", 0.0),
    # DreamBooth keys that may also be written at dataset/general level
    "class_tokens": ("str", None),
    "caption_extension": ("str", ".caption"),
    "cache_info": ("bool", False),
    "alpha_mask": ("bool", False),
}
SUBSET_ONLY_KEYS: dict[str, tuple[str, Any]] = {
    "image_dir": ("str", None),
    "is_reg": ("bool", False),
    "metadata_file": ("str", None),
}
DATASET_KEYS: dict[str, tuple[str, Any]] = {
    "resolution": ("reso", None),
    "batch_size": ("int", 1),
    "enable_bucket": ("bool", False),
    "min_bucket_reso": ("int", 256),
    "max_bucket_reso": ("int", 1024),
    "bucket_reso_steps": ("int", 64),
    "bucket_no_upscale": ("bool", False),
    "network_multiplier": ("float", 1.0),
    "validation_seed": ("int", None),
    "validation_split": ("float", 0.0),
    "resize_interpolation": ("str", None),
}
# argparse attribute -> config key where the names differ
ARG_TO_KEY = {"train_batch_size": "batch_size", "dataset_repeats": "num_repeats"}
INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".avif", ".jxl")


@dataclass
class SubsetParams:
    image_dir: str | None = None
    metadata_file: str | None = None
    is_reg: bool = False
    class_tokens: str | None = None
    caption_extension: str = ".caption"
    cache_info: bool = False
    alpha_mask: bool = False
    num_repeats: int = 1
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str | None = None
    secondary_separator: str | None = None
    caption_separator: str = ","
    enable_wildcard: bool = False
    color_aug: bool = False
    flip_aug: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    random_crop: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0
    custom_attributes: dict[str, Any] | None = None
    resize_interpolation: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0

    @property
    def is_dreambooth(self) -> bool:
        return self.metadata_file is None


@dataclass
class DatasetParams:
    resolution: tuple[int, int] = (512, 512)
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    network_multiplier: float = 1.0
    validation_seed: int | None = None
    validation_split: float = 0.0
    resize_interpolation: str | None = None
    prior_loss_weight: float = 1.0
    subsets: list[SubsetParams] = field(default_factory=list)


class DatasetConfigError(ValueError):
    """A dataset config or dataset flag is not what sd-scripts accepts."""


def parse_resolution(value: Any, where: str) -> tuple[int, int]:
    """int, [w, h], "S" or "W,H" -> (W, H)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, int):
            w = h = value
        elif isinstance(value, str):
            parts = [int(p) for p in value.split(",")]
            if len(parts) not in (1, 2):
                raise ValueError
            w, h = (parts[0], parts[0]) if len(parts) == 1 else parts
        elif isinstance(value, (list, tuple)) and len(value) == 2:
            w, h = (int(v) for v in value)
            if any(isinstance(v, bool) or not isinstance(v, int) for v in value):
                raise TypeError
        else:
            raise TypeError
    except (TypeError, ValueError) as e:
        raise DatasetConfigError(
            f"{where}: resolution must be an int, [width, height] or 'W,H'; got {value!r}"
        ) from e
    if w <= 0 or h <= 0:
        raise DatasetConfigError(f"{where}: resolution must be positive; got {value!r}")
    return (w, h)


def _check_type(key: str, kind: str, value: Any, where: str) -> Any:
    bad = False
    if value is None and kind in ("str", "range", "dict", "reso"):
        return value
    if kind == "bool":
        bad = not isinstance(value, bool)
    elif kind == "int":
        bad = isinstance(value, bool) or not isinstance(value, int)
    elif kind == "float":
        bad = isinstance(value, bool) or not isinstance(value, (int, float))
        value = value if bad else float(value)
    elif kind == "str":
        bad = not isinstance(value, str)
    elif kind == "dict":
        bad = not isinstance(value, dict)
    elif kind == "range":
        if isinstance(value, str):
            value = [v for v in value.split(",")]
        try:
            bad = len(value) != 2
            value = (float(value[0]), float(value[1]))
        except (TypeError, ValueError):
            bad = True
    elif kind == "reso":
        return parse_resolution(value, f"{where} key 'resolution'")
    if bad:
        expected = {"range": "[min, max] numbers", "dict": "a table"}.get(kind, kind)
        raise DatasetConfigError(f"{where}: key '{key}' must be {expected}; got {value!r}")
    if key == "resize_interpolation" and value is not None and value not in INTERPOLATIONS:
        raise DatasetConfigError(
            f"{where}: resize_interpolation must be one of {INTERPOLATIONS}; got {value!r}"
        )
    return value


def _validate_table(table: Any, allowed: dict[str, tuple[str, Any]], where: str, extra: tuple[str, ...] = ()):
    if not isinstance(table, dict):
        raise DatasetConfigError(f"{where} must be a table; got {type(table).__name__}")
    out = {}
    for key, value in table.items():
        if key in extra:
            out[key] = value
            continue
        if key not in allowed:
            if key in SUBSET_ONLY_KEYS:
                hint = " (it belongs in [[datasets.subsets]])"
            elif key in DATASET_KEYS:
                hint = " (it belongs in [[datasets]] or [general])"
            else:
                hint = f"; allowed keys: {', '.join(sorted(list(allowed) + list(extra)))}"
            raise DatasetConfigError(f"unknown key '{key}' in {where}{hint}")
        out[key] = _check_type(key, allowed[key][0], value, where)
    return out


def load_user_config(path: str | Path) -> dict[str, Any]:
    """Read a dataset config (.toml or .json) and validate the schema (no unknown keys, right types)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetConfigError(f"dataset config {path} does not exist (expected a .toml or .json file)")
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(path.read_text(encoding="utf-8-sig"))
        else:
            raw = toml.loads(path.read_text(encoding="utf-8-sig"))
    except (ValueError, toml.TomlDecodeError) as e:
        raise DatasetConfigError(
            f"dataset config {path} is not valid {path.suffix[1:] or 'TOML'}: {e}"
        ) from e
    return validate_user_config(raw, str(path))


def _table_array(value: Any, what: str, toml_form: str) -> list:
    if not isinstance(value, list):
        raise DatasetConfigError(f"{what} must be an array of tables ({toml_form})")
    return value


def validate_user_config(raw: Any, source: str = "dataset config") -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise DatasetConfigError(f"{source}: top level must be a table with [general] and [[datasets]]")
    for key in raw:
        if key not in ("general", "datasets"):
            raise DatasetConfigError(
                f"unknown key '{key}' at the top level of {source}; allowed: general, datasets"
            )
    general_allowed = {**DATASET_KEYS, **SUBSET_KEYS}
    general = _validate_table(raw.get("general", {}), general_allowed, f"[general] of {source}")
    datasets_raw = _table_array(raw.get("datasets", []), f"{source}: 'datasets'", "[[datasets]]")
    datasets = []
    for i, ds in enumerate(datasets_raw, 1):
        where = f"[[datasets]] #{i} of {source}"
        ds_v = _validate_table(ds, general_allowed, where, extra=("subsets",))
        subsets_raw = _table_array(ds_v.pop("subsets", []), f"{where}: 'subsets'", "[[datasets.subsets]]")
        subsets = []
        for j, ss in enumerate(subsets_raw, 1):
            sw = f"[[datasets.subsets]] #{j} of dataset #{i} in {source}"
            sv = _validate_table(ss, {**SUBSET_KEYS, **SUBSET_ONLY_KEYS}, sw)
            if "metadata_file" not in sv and "image_dir" not in sv:
                raise DatasetConfigError(
                    f"{sw}: needs 'image_dir' (DreamBooth) or 'metadata_file' (fine-tuning)"
                )
            subsets.append(sv)
        ds_v["subsets"] = subsets
        datasets.append(ds_v)
    return {"general": general, "datasets": datasets}


def _lookup(key: str, tables: list[dict[str, Any]], args_map: dict[str, Any], default: Any) -> Any:
    for t in tables:
        if key in t:
            return t[key]
    if key in args_map and args_map[key] is not None:
        return args_map[key]
    return default


def _args_map(args: argparse.Namespace | None) -> dict[str, Any]:
    """CLI values keyed by config names, type-checked the same way as the file."""
    if args is None:
        return {}
    out: dict[str, Any] = {}
    allowed = {**DATASET_KEYS, **SUBSET_KEYS}
    for name, value in vars(args).items():
        key = ARG_TO_KEY.get(name, name)
        if key in allowed and value is not None:
            kind = allowed[key][0]
            if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            out[key] = _check_type(key, kind, value, f"--{name}")
    if getattr(args, "caption_extention", None):  # sd-scripts keeps the old misspelt flag
        out["caption_extension"] = args.caption_extention
    return out


def check_subset_paths(subset: SubsetParams, where: str) -> None:
    """A missing image folder or metadata file is the first thing a user needs to hear about."""
    if subset.image_dir is not None and not Path(subset.image_dir).is_dir():
        raise DatasetConfigError(
            f"{where}: image_dir {subset.image_dir} does not exist or is not a directory"
        )
    if subset.metadata_file is not None and not Path(subset.metadata_file).is_file():
        raise DatasetConfigError(f"{where}: metadata_file {subset.metadata_file} does not exist")


def generate_params(
    user_config: dict[str, Any], args: argparse.Namespace | None, check_paths: bool = False
) -> list[DatasetParams]:
    """Resolve every field with subset -> dataset -> general -> CLI -> default precedence.

    check_paths: also verify that every image_dir / metadata_file exists (reported before other errors).
    """
    amap = _args_map(args)
    general = user_config.get("general", {})
    prior = float(getattr(args, "prior_loss_weight", 1.0) if args is not None else 1.0)
    out = []
    for i, ds in enumerate(user_config.get("datasets", []), 1):
        dp_kwargs = {k: _lookup(k, [ds, general], amap, d) for k, (_, d) in DATASET_KEYS.items()}
        seen: list[SubsetParams] = []
        for ss in ds["subsets"]:
            sp_kwargs = {k: _lookup(k, [ss, ds, general], amap, d) for k, (_, d) in SUBSET_KEYS.items()}
            for k, (_, d) in SUBSET_ONLY_KEYS.items():
                sp_kwargs[k] = ss.get(k, d)
            sp = SubsetParams(**sp_kwargs)
            if sp in seen:  # sd-scripts ignores a subset listed twice in one dataset
                logger.warning(
                    "dataset #%d: duplicate subset %s ignored", i, sp.image_dir or sp.metadata_file
                )
                continue
            seen.append(sp)
        kinds = {s.is_dreambooth for s in seen}
        if len(kinds) > 1:
            raise DatasetConfigError(
                f"dataset #{i} mixes DreamBooth subsets (image_dir) and fine-tuning subsets (metadata_file); "
                "put them in separate [[datasets]]"
            )
        if check_paths:
            for sp in seen:
                check_subset_paths(sp, f"dataset #{i}")
        if dp_kwargs["resolution"] is None:
            raise DatasetConfigError(
                f"dataset #{i}: no resolution; set 'resolution' in the dataset config or pass --resolution"
            )
        out.append(DatasetParams(**dp_kwargs, prior_loss_weight=prior, subsets=seen))
    return out


def parse_dreambooth_dir_name(name: str) -> tuple[int, str] | None:
    """`N_class tokens` -> (N, "class tokens"); None when the name does not start with a number."""
    head, _, rest = name.partition("_")
    try:
        n = int(head)
    except ValueError:
        return None
    return n, rest


def subsets_from_train_data_dir(base: str | Path, is_reg: bool) -> list[dict[str, Any]]:
    """The CLI form: each `N_name` subfolder becomes a subset with N repeats and class tokens "name"."""
    base = Path(base)
    kind = "--reg_data_dir" if is_reg else "--train_data_dir"
    if not base.is_dir():
        raise DatasetConfigError(f"{kind} {base} is not a directory")
    subsets = []
    for sub in sorted(base.iterdir()):
        if not sub.is_dir():
            continue
        parsed = parse_dreambooth_dir_name(sub.name)
        if parsed is None or parsed[0] < 1:
            logger.warning(
                "ignoring %s: folder name must be '<repeats>_<class tokens>', e.g. 10_sks dog", sub
            )
            continue
        subsets.append(
            {"image_dir": str(sub), "num_repeats": parsed[0], "class_tokens": parsed[1], "is_reg": is_reg}
        )
    if not subsets and not is_reg:
        raise DatasetConfigError(
            f"{kind} {base} has no '<repeats>_<name>' subfolders (e.g. '10_sks dog'); images must be inside them"
        )
    return subsets


def user_config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """--dataset_config, else --train_data_dir [+ --reg_data_dir] (DreamBooth) or --in_json (fine-tuning)."""
    cfg_path = getattr(args, "dataset_config", None)
    if cfg_path:
        ignored = [f for f in ("train_data_dir", "reg_data_dir", "in_json") if getattr(args, f, None)]
        if ignored:
            logger.warning("--dataset_config is given; ignoring %s", ", ".join("--" + f for f in ignored))
        return load_user_config(cfg_path)
    train_dir = getattr(args, "train_data_dir", None)
    in_json = getattr(args, "in_json", None)
    if in_json:
        subsets = [{"metadata_file": in_json, **({"image_dir": train_dir} if train_dir else {})}]
    elif train_dir:
        subsets = subsets_from_train_data_dir(train_dir, False)
        if getattr(args, "reg_data_dir", None):
            subsets += subsets_from_train_data_dir(args.reg_data_dir, True)
    else:
        raise DatasetConfigError(
            "no training data: pass --dataset_config, or --train_data_dir (or --in_json)"
        )
    return {"general": {}, "datasets": [{"subsets": subsets}]}


def add_dataset_arguments(parser: argparse.ArgumentParser, text_encoder_caching: bool = True) -> None:
    """Add sd-scripts' dataset, caption, bucket and cache flags with sd-scripts defaults."""
    a = parser.add_argument
    a("--dataset_config", type=str, default=None, help="dataset config (.toml/.json)")
    a("--train_data_dir", type=str, default=None, help="folder with '<repeats>_<name>' image subfolders")
    a("--reg_data_dir", type=str, default=None, help="regularization images, same layout")
    a("--in_json", type=str, default=None, help="fine-tuning metadata JSON")
    a("--resolution", type=str, default=None, help="'size' or 'width,height'")
    a("--train_batch_size", type=int, default=1)
    a("--dataset_repeats", type=int, default=1, help="num_repeats for fine-tuning datasets")
    a("--enable_bucket", action="store_true")
    a("--min_bucket_reso", type=int, default=256)
    a("--max_bucket_reso", type=int, default=1024)
    a("--bucket_reso_steps", type=int, default=64)
    a("--bucket_no_upscale", action="store_true")
    a("--resize_interpolation", type=str, default=None, choices=INTERPOLATIONS)
    a("--shuffle_caption", action="store_true")
    a("--caption_separator", type=str, default=",")
    a("--caption_extension", type=str, default=".caption")
    a("--caption_extention", type=str, default=None, help="old misspelling of --caption_extension")
    a("--keep_tokens", type=int, default=0)
    a("--keep_tokens_separator", type=str, default="")
    a("--secondary_separator", type=str, default=None)
    a("--enable_wildcard", action="store_true")
    a("--caption_prefix", type=str, default=None)
    a("--caption_suffix", type=str, default=None)
    a("--color_aug", action="store_true")
    a("--flip_aug", action="store_true")
    a("--face_crop_aug_range", type=str, default=None)
    a("--random_crop", action="store_true")
    a("--caption_dropout_rate", type=float, default=0.0)
    a("--caption_dropout_every_n_epochs", type=int, default=0)
    a("--caption_tag_dropout_rate", type=float, default=0.0)
    a("--token_warmup_min", type=int, default=1)
    a("--token_warmup_step", type=float, default=0)
    a("--alpha_mask", action="store_true")
    a("--prior_loss_weight", type=float, default=1.0)
    a("--validation_split", type=float, default=0.0)
    a("--validation_seed", type=int, default=None)
    a("--max_data_loader_n_workers", type=int, default=8)
    a("--persistent_data_loader_workers", action="store_true")
    a("--debug_dataset", action="store_true")
    a("--cache_latents", action="store_true")
    a("--cache_latents_to_disk", action="store_true", help="implies --cache_latents")
    a("--vae_batch_size", type=int, default=1)
    a("--skip_cache_check", action="store_true")
    if text_encoder_caching:
        a("--cache_text_encoder_outputs", action="store_true")
        a(
            "--cache_text_encoder_outputs_to_disk",
            action="store_true",
            help="implies --cache_text_encoder_outputs",
        )
