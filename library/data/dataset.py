"""Bucketed datasets: one item = one pre-built batch (sd-scripts layout), plus the group and loader."""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing as mp
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from .buckets import BucketManager, Size, adjust_min_max_bucket_reso, crop_top_left_for, get_crop_ltrb
from .cache_rules import check_cache_args
from .captions import (
    caption_options,
    deterministic_caption,
    draw_caption_dropout,
    process_caption,
    read_caption_file,
    tag_frequency,
)
from .config import (
    IMAGE_EXTENSIONS,
    DatasetConfigError,
    DatasetParams,
    SubsetParams,
    generate_params,
    user_config_from_args,
)
from .images import (
    color_aug,
    list_images,
    load_image,
    mask_to_tensor,
    probe_image,
    resize_and_crop,
    to_tensor,
)

logger = logging.getLogger(__name__)


@dataclass
class ImageInfo:
    key: str
    path: Path
    caption: str
    num_repeats: int
    is_reg: bool
    subset: SubsetParams
    image_size: Size
    bucket_reso: Size | None = None
    resized_size: Size | None = None
    # latent cache: in memory (tensors) or on disk (npz path, loaded per fetch)
    latents: torch.Tensor | None = None
    latents_flipped: torch.Tensor | None = None
    latents_original_size: Size | None = None
    latents_crop_ltrb: tuple[float, float, float, float] | None = None
    latents_npz: Path | None = None
    tags: str | None = None  # fine-tuning metadata tags (for ss_tag_frequency)
    alpha_mask: torch.Tensor | None = None  # (H, W) in [0, 1], in-memory latent cache with alpha_mask
    # text-encoder cache
    te_outputs: dict[str, torch.Tensor] | None = None
    te_npz: Path | None = None


@dataclass
class _BatchIndex:
    bucket: int
    batch_size: int
    batch: int


class BucketDataset(Dataset):
    """A DreamBooth or fine-tuning dataset. `len()` is the number of batches of one epoch."""

    def __init__(self, params: DatasetParams, seed: int, name: str = "dataset") -> None:
        self.params = params
        self.seed = seed
        self.name = name
        self.width, self.height = params.resolution
        self.batch_size = params.batch_size
        self.enable_bucket = params.enable_bucket
        self.bucket_no_upscale = params.bucket_no_upscale
        self.min_bucket_reso = params.min_bucket_reso
        self.max_bucket_reso = params.max_bucket_reso
        self.bucket_reso_steps = params.bucket_reso_steps
        self.prior_loss_weight = params.prior_loss_weight
        self.network_multiplier = params.network_multiplier
        self.subsets = params.subsets
        self.is_dreambooth = all(s.is_dreambooth for s in params.subsets)
        self.current_epoch = 0
        self.current_step = 0
        self.max_train_steps = 0
        # shared with DataLoader workers so that every worker follows the epoch/step of the loop
        self._shared_epoch = mp.RawValue("i", 0)
        self._shared_step = mp.RawValue("q", 0)
        self._check_params()
        if self.enable_bucket:
            self.min_bucket_reso, self.max_bucket_reso = adjust_min_max_bucket_reso(
                params.resolution,
                params.min_bucket_reso,
                params.max_bucket_reso,
                params.bucket_reso_steps,
                name,
            )
        self.image_data: dict[str, ImageInfo] = {}
        self.subset_img_count: list[int] = []
        self.tag_frequency: dict[str, dict[str, int]] = {}
        self.num_train_images = 0
        self.num_reg_images = 0
        self._load_subsets()
        self.make_buckets()

    # ---------------------------------------------------------------- building
    def _check_params(self) -> None:
        for s in self.subsets:
            where = f"{self.name}, subset {s.image_dir or s.metadata_file}"
            if s.face_crop_aug_range is not None:
                raise DatasetConfigError(f"{where}: face_crop_aug_range is not supported by this trainer")
            if s.num_repeats < 1:
                raise DatasetConfigError(f"{where}: num_repeats must be >= 1; got {s.num_repeats}")
        if self.params.validation_split:
            raise DatasetConfigError(f"{self.name}: validation_split > 0 is not supported by this trainer")
        if self.batch_size < 1:
            raise DatasetConfigError(f"{self.name}: batch_size must be >= 1; got {self.batch_size}")

    def _register(self, info: ImageInfo) -> bool:
        if info.key in self.image_data:
            logger.warning(
                "%s: image %s appears in more than one subset; keeping the first", self.name, info.path
            )
            return False
        self.image_data[info.key] = info
        return True

    def _load_subsets(self) -> None:
        reg_infos: list[ImageInfo] = []
        for s in self.subsets:
            infos = self._dreambooth_infos(s) if s.is_dreambooth else self._finetune_infos(s)
            if not infos:
                logger.warning("%s: no readable images in %s", self.name, s.image_dir or s.metadata_file)
            self.subset_img_count.append(len(infos))
            # sd-scripts keys tag counts by the image folder (DreamBooth, counting captions) or by the
            # metadata file (fine-tuning, counting the `tags` field)
            if s.is_dreambooth:
                dir_name, texts = os.path.basename(s.image_dir or ""), [i.caption for i in infos]
            else:
                dir_name, texts = os.path.basename(s.metadata_file or ""), [i.tags for i in infos if i.tags]
            freq = self.tag_frequency.setdefault(dir_name, {})
            for tag, n in tag_frequency(texts).items():
                freq[tag] = freq.get(tag, 0) + n
            if s.is_reg:
                reg_infos.extend(infos)
                continue
            for info in infos:
                if self._register(info):
                    self.num_train_images += info.num_repeats
        if reg_infos:
            self._add_reg_images(reg_infos)
        if not self.image_data:
            where = ", ".join(str(s.image_dir or s.metadata_file) for s in self.subsets if not s.is_reg)
            raise DatasetConfigError(
                f"{self.name}: no training images found in {where or 'any subset'} "
                f"(expected {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} files directly inside)"
            )

    def _add_reg_images(self, reg_infos: list[ImageInfo]) -> None:
        """Round-robin reg images until they match the number of train images (with repeats).

        `num_reg_images` is the count before this fill (with repeats), as sd-scripts reports it in
        `ss_num_reg_images`."""
        self.num_reg_images = sum(info.num_repeats for info in reg_infos)
        n = 0
        first = True
        while n < self.num_train_images:
            for info in reg_infos:
                if first:
                    self._register(info)
                    n += info.num_repeats
                else:
                    info.num_repeats += 1
                    n += 1
                if n >= self.num_train_images:
                    break
            first = False

    def _dreambooth_infos(self, s: SubsetParams) -> list[ImageInfo]:
        assert s.image_dir is not None
        image_dir = Path(s.image_dir)
        if not image_dir.is_dir():
            raise DatasetConfigError(
                f"{self.name}: image_dir {image_dir} does not exist or is not a directory"
            )
        infos = []
        for path in list_images(image_dir):
            size = probe_image(path)
            if size is None:
                continue
            cap = read_caption_file(path, s.caption_extension, s.enable_wildcard)
            if cap is None:
                cap = s.class_tokens or ""
            key = str(path.resolve())
            infos.append(ImageInfo(key, path, cap, s.num_repeats, s.is_reg, s, size))
        return infos

    def _finetune_infos(self, s: SubsetParams) -> list[ImageInfo]:
        assert s.metadata_file is not None
        md_path = Path(s.metadata_file)
        if not md_path.is_file():
            raise DatasetConfigError(f"{self.name}: metadata_file {md_path} does not exist")
        if s.image_dir is not None and not Path(s.image_dir).is_dir():
            raise DatasetConfigError(
                f"{self.name}: image_dir {s.image_dir} does not exist or is not a directory"
            )
        text = md_path.read_text(encoding="utf-8-sig")  # tolerate a BOM (Windows editors)
        try:
            if md_path.suffix.lower() == ".jsonl":
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
                entries = [(r["image_path"], r) for r in rows]
            else:
                entries = list(json.loads(text).items())
        except (ValueError, KeyError, AttributeError, TypeError) as e:
            raise DatasetConfigError(
                f"{md_path}: expected JSON {{image_key: {{caption, tags}}}} or JSONL rows with image_path; {e}"
            ) from e
        infos = []
        for key, md in entries:
            path = self._resolve_ft_image(str(key), s.image_dir)
            if path is None:
                raise DatasetConfigError(
                    f"{md_path}: image for key {key!r} not found (image_dir={s.image_dir})"
                )
            size = probe_image(path)
            if size is None:
                continue
            caption, tags = md.get("caption"), md.get("tags")
            if caption is None:
                caption = tags
            elif tags:
                caption = caption + s.caption_separator + tags
            info = ImageInfo(str(path.resolve()), path, caption or "", s.num_repeats, False, s, size)
            info.tags = tags if isinstance(tags, str) else None
            infos.append(info)
        return infos

    @staticmethod
    def _resolve_ft_image(key: str, image_dir: str | None) -> Path | None:
        p = Path(key)
        if p.is_file():
            return p
        base = Path(image_dir) if image_dir else Path(".")
        cand = base / key
        if cand.is_file():
            return cand
        for ext in IMAGE_EXTENSIONS:
            for e in (ext, ext.upper()):
                if (base / (key + e)).is_file():
                    return base / (key + e)
        return None

    def make_buckets(self) -> None:
        """Assign each image a bucket, fill buckets with repeats, build the batch index, shuffle (epoch 0)."""
        if self.enable_bucket:
            self.bucket_manager = BucketManager(
                self.bucket_no_upscale,
                (self.width, self.height),
                self.min_bucket_reso,
                self.max_bucket_reso,
                self.bucket_reso_steps,
            )
            if not self.bucket_no_upscale:
                self.bucket_manager.make_buckets()
            else:
                self.bucket_manager.set_predefined_resos([])
        else:
            self.bucket_manager = BucketManager(False, (self.width, self.height), None, None, None)
            self.bucket_manager.set_predefined_resos([(self.width, self.height)])
        ar_errors = []
        for info in self.image_data.values():
            w, h = info.image_size
            try:
                info.bucket_reso, info.resized_size, err = self.bucket_manager.select_bucket(w, h)
            except ValueError as e:  # bucket_no_upscale with an image smaller than one step
                raise DatasetConfigError(f"{self.name}: image {info.path} ({w}x{h}): {e}") from e
            ar_errors.append(err)
            for _ in range(info.num_repeats):
                self.bucket_manager.add_image(info.bucket_reso, info.key)
        self.bucket_manager.sort()
        buckets = {}
        for i, (reso, keys) in enumerate(zip(self.bucket_manager.resos, self.bucket_manager.buckets)):
            if keys:
                buckets[i] = {"resolution": list(reso), "count": len(keys)}
        mean_err = float(np.mean(np.abs(ar_errors))) if ar_errors else 0.0
        self.bucket_info = {"buckets": buckets, "mean_img_ar_error": mean_err}
        self.batch_index: list[_BatchIndex] = []
        for b, keys in enumerate(self.bucket_manager.buckets):
            for k in range(math.ceil(len(keys) / self.batch_size)):
                self.batch_index.append(_BatchIndex(b, self.batch_size, k))
        self._shuffle_buckets()

    # ---------------------------------------------------------------- epoch/step state
    def _shuffle_buckets(self) -> None:
        random.seed(self.seed + self.current_epoch)
        random.shuffle(self.batch_index)
        self.bucket_manager.shuffle()

    def set_current_epoch(self, epoch: int) -> None:
        """Call with epoch+1 at the start of each epoch (sd-scripts); reshuffles once per new epoch."""
        self._shared_epoch.value = epoch
        self._sync_state()

    def set_current_step(self, step: int) -> None:
        self._shared_step.value = step
        self.current_step = step

    def set_max_train_steps(self, max_train_steps: int) -> None:
        self.max_train_steps = max_train_steps
        for s in self.subsets:
            if 0 < s.token_warmup_step < 1:  # a fraction of the run
                s.token_warmup_step = math.floor(s.token_warmup_step * max_train_steps)

    def _sync_state(self) -> None:
        target = self._shared_epoch.value
        while self.current_epoch < target:
            self.current_epoch += 1
            self._shuffle_buckets()
        self.current_step = self._shared_step.value

    # ---------------------------------------------------------------- fetching
    def __len__(self) -> int:
        return len(self.batch_index)

    def _load_latents(self, info: ImageInfo, flipped: bool) -> tuple[torch.Tensor, Size, tuple, Any]:
        mask = None
        if info.latents is not None:
            lat = info.latents_flipped if flipped else info.latents
            assert lat is not None and info.latents_original_size is not None
            orig, crop = info.latents_original_size, info.latents_crop_ltrb or (0, 0, 0, 0)
            mask = info.alpha_mask
        else:
            assert info.latents_npz is not None
            with np.load(info.latents_npz) as npz:
                lat = torch.from_numpy(npz["latents_flipped" if flipped else "latents"]).float()
                orig = tuple(int(v) for v in npz["original_size"].tolist())
                crop = tuple(float(v) for v in npz["crop_ltrb"].tolist())
                if info.subset.alpha_mask:
                    mask = torch.from_numpy(npz["alpha_mask"]).float()
        if mask is not None and flipped:
            mask = torch.flip(mask, dims=[1])
        return lat, orig, crop, mask  # type: ignore[return-value]

    def _load_image(self, info: ImageInfo) -> tuple[torch.Tensor, Size, tuple, torch.Tensor | None]:
        s = info.subset
        img, mask = load_image(info.path, alpha=s.alpha_mask)
        original = img.size
        assert info.bucket_reso is not None and info.resized_size is not None
        bw, bh = info.bucket_reso
        if not self.enable_bucket and s.random_crop and img.size[0] >= bw and img.size[1] >= bh:
            # sd-scripts: without buckets an oversized image is randomly cropped at its own scale
            left, top = random.randint(0, img.size[0] - bw), random.randint(0, img.size[1] - bh)
            box = (left, top, left + bw, top + bh)
            img = img.crop(box)
            mask = mask.crop(box) if mask is not None else None
            crop_ltrb: tuple = (0, 0, 0, 0)
        else:
            out = resize_and_crop(
                img, info.bucket_reso, info.resized_size, s.random_crop, s.resize_interpolation, mask
            )
            img, mask = out if isinstance(out, tuple) else (out, None)
            crop_ltrb = get_crop_ltrb(info.bucket_reso, original)
        if s.color_aug:
            img = color_aug(img)
        return to_tensor(img), original, crop_ltrb, (mask_to_tensor(mask) if mask is not None else None)

    def __getitem__(self, index: int) -> dict[str, Any]:
        self._sync_state()
        bi = self.batch_index[index]
        keys = self.bucket_manager.buckets[bi.bucket][
            bi.batch * bi.batch_size : (bi.batch + 1) * bi.batch_size
        ]
        images, latents, captions, weights, flips, masks = [], [], [], [], [], []
        orig_hw, crop_tl, target_hw, paths, te_list, attrs, dropped = [], [], [], [], [], [], []
        for key in keys:
            info = self.image_data[key]
            s = info.subset
            weights.append(self.prior_loss_weight if info.is_reg else 1.0)
            flipped = s.flip_aug and random.random() < 0.5
            if info.latents is not None or info.latents_npz is not None:
                lat, original, crop_ltrb, mask = self._load_latents(info, flipped)
                latents.append(lat)
                target = info.bucket_reso
            else:
                img, original, crop_ltrb, mask = self._load_image(info)
                if flipped:
                    img = torch.flip(img, dims=[2])
                    mask = torch.flip(mask, dims=[1]) if mask is not None else None
                images.append(img)
                target = (img.shape[2], img.shape[1])
            assert target is not None
            masks.append(mask)
            flips.append(flipped)
            orig_hw.append((int(original[1]), int(original[0])))
            crop_tl.append(crop_top_left_for(crop_ltrb, target, flipped))
            target_hw.append((int(target[1]), int(target[0])))
            paths.append(str(info.path))
            attrs.append(s.custom_attributes or {})
            # the dropout draw comes first, as inside process_caption (same RNG order as sd-scripts)
            opts = caption_options(s)
            is_dropped = draw_caption_dropout(opts, self.current_epoch)
            dropped.append(is_dropped)
            if info.te_outputs is not None or info.te_npz is not None:
                # cached text: the trainer applies dropout to the cached tensors using `caption_dropped`
                te_list.append(self._load_te(info))
                captions.append("" if is_dropped else deterministic_caption(info.caption, opts))
            elif is_dropped:
                captions.append("")
            else:
                no_drop = replace(opts, caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0)
                captions.append(process_caption(info.caption, no_drop, self.current_epoch, self.current_step))
        return {
            "images": torch.stack(images) if images else None,
            "latents": torch.stack(latents) if latents else None,
            "captions": captions,
            "caption_dropped": dropped,
            "loss_weights": torch.tensor(weights, dtype=torch.float32),
            "original_sizes_hw": torch.tensor(orig_hw, dtype=torch.long),
            "crop_top_lefts": torch.tensor(crop_tl, dtype=torch.long),
            "target_sizes_hw": torch.tensor(target_hw, dtype=torch.long),
            "flipped": flips,
            "alpha_masks": _stack_masks(masks, target_hw),
            "image_keys": list(keys),
            "absolute_paths": paths,
            "network_multipliers": torch.full((len(keys),), float(self.network_multiplier)),
            "custom_attributes": attrs,
            "text_encoder_outputs": (
                {k: torch.stack([t[k] for t in te_list]) for k in te_list[0]} if te_list else None
            ),
        }

    def _load_te(self, info: ImageInfo) -> dict[str, torch.Tensor]:
        if info.te_outputs is not None:
            return info.te_outputs
        assert info.te_npz is not None
        with np.load(info.te_npz) as npz:
            return {k: torch.from_numpy(npz[k]) for k in npz.files if k != "fingerprint"}


def _stack_masks(masks: list[torch.Tensor | None], target_hw: list[tuple[int, int]]) -> torch.Tensor | None:
    """(B, H, W) alpha masks, or None when no sample has one (samples without one count as opaque)."""
    if all(m is None for m in masks):
        return None
    return torch.stack([m if m is not None else torch.ones(hw) for m, hw in zip(masks, target_hw)])


class DatasetGroup(ConcatDataset):
    """All datasets of a run; the DataLoader shuffles batches across them."""

    def __init__(self, datasets: list[BucketDataset]) -> None:
        super().__init__(datasets)
        self.datasets: list[BucketDataset] = list(datasets)

    @property
    def num_train_images(self) -> int:
        return sum(d.num_train_images for d in self.datasets)

    @property
    def num_reg_images(self) -> int:
        return sum(d.num_reg_images for d in self.datasets)

    def image_infos(self) -> list[ImageInfo]:
        return [info for d in self.datasets for info in d.image_data.values()]

    def set_current_epoch(self, epoch: int) -> None:
        for d in self.datasets:
            d.set_current_epoch(epoch)

    def set_current_step(self, step: int) -> None:
        for d in self.datasets:
            d.set_current_step(step)

    def set_max_train_steps(self, max_train_steps: int) -> None:
        for d in self.datasets:
            d.set_max_train_steps(max_train_steps)


def resolve_seed(args: argparse.Namespace) -> int:
    seed = getattr(args, "seed", None)
    return int(seed) if seed is not None else random.randint(0, 2**32 - 1)


def build_dataset_group(args: argparse.Namespace, bucket_step_multiple: int = 32) -> DatasetGroup:
    """Build the dataset(s) from parsed sd-scripts flags (`--dataset_config` or the CLI-only forms).

    bucket_step_multiple: the model's spatial granularity (SDXL 32, Anima 16); bucket_reso_steps and the
    no-bucket resolution must be multiples of it.
    """
    user_config = user_config_from_args(args)
    params = generate_params(user_config, args, check_paths=True)
    if not params:
        raise DatasetConfigError("the dataset config has no [[datasets]]")
    seed = resolve_seed(args)
    datasets = []
    for i, p in enumerate(params, 1):
        if p.enable_bucket and p.bucket_reso_steps % bucket_step_multiple != 0:
            raise DatasetConfigError(
                f"dataset #{i}: bucket_reso_steps {p.bucket_reso_steps} must be a multiple of {bucket_step_multiple}"
            )
        if not p.enable_bucket and (
            p.resolution[0] % bucket_step_multiple or p.resolution[1] % bucket_step_multiple
        ):
            raise DatasetConfigError(
                f"dataset #{i}: resolution {p.resolution} must be a multiple of {bucket_step_multiple} "
                "(or use enable_bucket)"
            )
        datasets.append(BucketDataset(p, seed, name=f"dataset #{i}"))
    group = DatasetGroup(datasets)
    # Refuse cache/augmentation clashes now, before any model is loaded. Caption dropout is checked
    # later, per architecture (Anima applies it to cached outputs, SDXL cannot).
    check_cache_args(group, args, allow_caption_dropout=True)
    return group


def collate_unwrap(items: list[dict[str, Any]]) -> dict[str, Any]:
    """DataLoader(batch_size=1) collate: the dataset item already is the batch."""
    return items[0]


def make_dataloader(dataset: Dataset, args: argparse.Namespace, shuffle: bool = True) -> DataLoader:
    n_workers = min(int(getattr(args, "max_data_loader_n_workers", 8)), os.cpu_count() or 1)
    persistent = bool(getattr(args, "persistent_data_loader_workers", False)) and n_workers > 0
    return DataLoader(
        dataset,
        batch_size=1,
        shuffle=shuffle,
        collate_fn=collate_unwrap,
        num_workers=n_workers,
        persistent_workers=persistent,
    )
