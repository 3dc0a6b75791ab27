"""`ss_*` dataset metadata for saved networks, as sd-scripts writes it; every value is a string."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from .dataset import DatasetGroup


def _dir_name(path: str | None) -> str:
    return os.path.basename(os.path.normpath(path)) if path else ""


def dataset_metadata(
    group: DatasetGroup, args: argparse.Namespace, total_batch_size: int | None = None
) -> dict[str, str]:
    """The dataset part of the ss_* header.

    With `--dataset_config`: ss_datasets / ss_tag_frequency / ss_dataset_dirs. Without it (CLI-only
    form): the flat ss_batch_size_per_device, ss_resolution, ... keys, as sd-scripts writes them.
    ss_num_train_images and ss_num_reg_images are always included.
    """
    md: dict[str, Any] = {
        "ss_num_train_images": group.num_train_images,
        "ss_num_reg_images": group.num_reg_images,
    }
    if getattr(args, "dataset_config", None):
        md.update(_config_metadata(group))
    else:
        md.update(_flat_metadata(group, args, total_batch_size))
    return {k: v if isinstance(v, str) else str(v) for k, v in md.items()}


def _config_metadata(group: DatasetGroup) -> dict[str, str]:
    datasets, tag_freq, dirs = [], {}, {}
    for d in group.datasets:
        entry: dict[str, Any] = {
            "is_dreambooth": d.is_dreambooth,
            "batch_size_per_device": d.batch_size,
            "num_train_images": d.num_train_images,
            "num_reg_images": d.num_reg_images,
            "resolution": (d.width, d.height),
            "enable_bucket": bool(d.enable_bucket),
            "min_bucket_reso": d.min_bucket_reso,
            "max_bucket_reso": d.max_bucket_reso,
            "tag_frequency": d.tag_frequency,
            "bucket_info": d.bucket_info,
            "resize_interpolation": d.params.resize_interpolation,
        }
        subsets = []
        for s, count in zip(d.subsets, d.subset_img_count):
            sm: dict[str, Any] = {
                "img_count": count,
                "num_repeats": s.num_repeats,
                "color_aug": bool(s.color_aug),
                "flip_aug": bool(s.flip_aug),
                "random_crop": bool(s.random_crop),
                "shuffle_caption": bool(s.shuffle_caption),
                "keep_tokens": s.keep_tokens,
                "keep_tokens_separator": s.keep_tokens_separator,
                "secondary_separator": s.secondary_separator,
                "enable_wildcard": bool(s.enable_wildcard),
                "caption_prefix": s.caption_prefix,
                "caption_suffix": s.caption_suffix,
                "resize_interpolation": s.resize_interpolation,
            }
            dir_key = None
            if s.image_dir:
                sm["image_dir"] = _dir_name(s.image_dir)
                dir_key = sm["image_dir"]
            if d.is_dreambooth:
                sm["class_tokens"] = s.class_tokens
                sm["is_reg"] = s.is_reg
                if s.is_reg:
                    dir_key = None  # reg folders are not listed in ss_dataset_dirs
            else:
                sm["metadata_file"] = _dir_name(s.metadata_file)
                dir_key = sm["metadata_file"]
            subsets.append(sm)
            if dir_key is not None:
                name, i = dir_key, 2
                while name in dirs:  # the same folder in several datasets gets " (2)", " (3)", ...
                    name = f"{dir_key} ({i})"
                    i += 1
                dirs[name] = {"n_repeats": s.num_repeats, "img_count": count}
        entry["subsets"] = subsets
        datasets.append(entry)
        for dir_name, freq in d.tag_frequency.items():
            tag_freq.setdefault(dir_name, freq)
    return {
        "ss_datasets": json.dumps(datasets),
        "ss_tag_frequency": json.dumps(tag_freq),
        "ss_dataset_dirs": json.dumps(dirs),
    }


def _flat_metadata(
    group: DatasetGroup, args: argparse.Namespace, total_batch_size: int | None
) -> dict[str, Any]:
    d = group.datasets[0]
    dirs: dict[str, Any] = {}
    reg_dirs: dict[str, Any] = {}
    for s, count in zip(d.subsets, d.subset_img_count):
        target = reg_dirs if s.is_reg else dirs
        name = _dir_name(s.image_dir) if d.is_dreambooth else _dir_name(s.metadata_file)
        target[name] = {"n_repeats": s.num_repeats, "img_count": count}
    bs = getattr(args, "train_batch_size", d.batch_size)
    return {
        "ss_batch_size_per_device": bs,
        "ss_total_batch_size": total_batch_size if total_batch_size is not None else bs,
        # sd-scripts turns --resolution into a (w, h) tuple before writing it: "(512, 512)"
        "ss_resolution": (d.width, d.height),
        "ss_color_aug": bool(getattr(args, "color_aug", False)),
        "ss_flip_aug": bool(getattr(args, "flip_aug", False)),
        "ss_random_crop": bool(getattr(args, "random_crop", False)),
        "ss_shuffle_caption": bool(getattr(args, "shuffle_caption", False)),
        "ss_enable_bucket": bool(d.enable_bucket),
        "ss_bucket_no_upscale": bool(d.bucket_no_upscale),
        "ss_min_bucket_reso": d.min_bucket_reso,
        "ss_max_bucket_reso": d.max_bucket_reso,
        "ss_keep_tokens": getattr(args, "keep_tokens", 0),
        "ss_dataset_dirs": json.dumps(dirs),
        "ss_reg_dataset_dirs": json.dumps(reg_dirs),
        "ss_tag_frequency": json.dumps(d.tag_frequency),
        "ss_bucket_info": json.dumps(d.bucket_info),
    }
