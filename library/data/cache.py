"""Latent and text-encoder output caches, in memory or as sd-scripts-compatible `.npz` files.

Improvement over sd-scripts: every disk cache carries an extra `fingerprint` key (JSON string) made of
the image's mtime/size and the settings that shaped the tensors (bucket, resized size, flip, caption,
caller settings such as the VAE). A file is reused only when its fingerprint matches; otherwise it is
rebuilt. Extra keys are ignored by sd-scripts, so the files stay loadable there.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from library.io.atomic_io import save_npz_atomic

from .buckets import get_crop_ltrb
from .cache_rules import check_latent_cache_compat, check_te_cache_compat, wants_latent_cache, wants_te_cache
from .captions import caption_options, deterministic_caption
from .config import DatasetConfigError
from .dataset import DatasetGroup, ImageInfo
from .images import load_image, mask_to_tensor, resize_and_crop, to_tensor

logger = logging.getLogger(__name__)

LatentEncoder = Callable[[torch.Tensor], torch.Tensor]
TextEncoder = Callable[[list[str]], dict[str, torch.Tensor]]
FINGERPRINT_KEY = "fingerprint"
_FP_VERSION = 1


def latents_npz_path(image_path: Path, image_size: tuple[int, int], suffix: str = "_sdxl") -> Path:
    """`<stem>_<W:04d>x<H:04d><suffix>.npz` next to the image (W, H = original image size)."""
    return image_path.with_name(f"{image_path.stem}_{image_size[0]:04d}x{image_size[1]:04d}{suffix}.npz")


def te_npz_path(image_path: Path, suffix: str = "_te_outputs") -> Path:
    return image_path.with_name(f"{image_path.stem}{suffix}.npz")


def _file_stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_mtime_ns, st.st_size]


def latent_fingerprint(info: ImageInfo, flip: bool, settings: str) -> str:
    s = info.subset
    return json.dumps(
        {
            "v": _FP_VERSION,
            "image": _file_stamp(info.path),
            "bucket": list(info.bucket_reso or ()),
            "resized": list(info.resized_size or ()),
            "flip": bool(flip),
            "interp": s.resize_interpolation,
            "alpha": bool(s.alpha_mask),
            "settings": settings,
        },
        sort_keys=True,
    )


def te_fingerprint(caption: str, settings: str) -> str:
    return json.dumps({"v": _FP_VERSION, "caption": caption, "settings": settings}, sort_keys=True)


def npz_is_valid(path: Path, required: list[str], fingerprint: str, skip_check: bool) -> bool:
    """Reusable iff it exists and (unless skip_check) has the keys and the same fingerprint."""
    if not path.is_file():
        return False
    if skip_check:
        return True
    try:
        with np.load(path) as npz:
            if any(k not in npz.files for k in required + [FINGERPRINT_KEY]):
                return False
            return str(npz[FINGERPRINT_KEY]) == fingerprint
    except Exception as e:  # a truncated or foreign file is simply rebuilt
        logger.warning("cache %s is unreadable (%s); rebuilding it", path, e)
        return False


def _check_unique_paths(items: list[tuple[ImageInfo, Path, str]]) -> None:
    seen: dict[Path, str] = {}
    for info, path, fp in items:
        if path in seen and seen[path] != fp:
            raise DatasetConfigError(
                f"{info.path} is used twice with different settings (e.g. two datasets with different "
                f"buckets or captions) but both would share the disk cache {path.name}; cache in memory instead"
            )
        seen[path] = fp


def _share(items: list, process_index: int, num_processes: int) -> list:
    return items[process_index::num_processes]


def _load_bucket_images(infos: list[ImageInfo]) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Centre-cropped bucket images (B,3,H,W) and, for alpha_mask subsets, their (H,W) alpha masks."""
    out, masks = [], []
    for info in infos:
        assert info.bucket_reso is not None and info.resized_size is not None
        rgb, alpha = load_image(info.path, alpha=info.subset.alpha_mask)
        res = resize_and_crop(
            rgb, info.bucket_reso, info.resized_size, False, info.subset.resize_interpolation, alpha
        )
        img, mask = res if isinstance(res, tuple) else (res, None)
        out.append(to_tensor(img))
        masks.append(mask_to_tensor(mask) if mask is not None else None)
    return torch.stack(out), masks


def cache_latents(
    group: DatasetGroup,
    encode_latents: LatentEncoder,
    *,
    to_disk: bool,
    vae_batch_size: int = 1,
    suffix: str = "_sdxl",
    skip_cache_check: bool = False,
    settings: str = "",
    process_index: int = 0,
    num_processes: int = 1,
    wait_for_everyone: Callable[[], Any] | None = None,
    show_progress: bool = True,
) -> int:
    """Encode every image once (per bucket, `vae_batch_size` at a time); returns how many were encoded.

    `encode_latents(images)` gets (B,3,H,W) in [-1,1] and returns unscaled latents (B,C,h,w); with
    flip_aug it is also called on the mirrored images. On disk, work is split across processes by index;
    call with every process and pass `accelerator.wait_for_everyone`.
    """
    check_latent_cache_compat(group)
    infos = sorted(group.image_infos(), key=lambda i: (i.bucket_reso, i.key))
    plans = []
    for info in infos:
        flip = info.subset.flip_aug
        fp = latent_fingerprint(info, flip, settings)
        plans.append((info, latents_npz_path(info.path, info.image_size, suffix), fp))
    if to_disk:
        _check_unique_paths(plans)
        todo, seen = [], set()
        for info, path, fp in plans:
            required = ["latents", "original_size", "crop_ltrb"]
            required += ["latents_flipped"] if info.subset.flip_aug else []
            required += ["alpha_mask"] if info.subset.alpha_mask else []
            if path not in seen and not npz_is_valid(path, required, fp, skip_cache_check):
                todo.append((info, path, fp))
            seen.add(path)
        work = _share(todo, process_index, num_processes)
    else:
        todo = work = plans
    n = _encode_latents(work, encode_latents, to_disk, vae_batch_size, show_progress)
    if to_disk:
        if wait_for_everyone is not None:
            wait_for_everyone()
        for info, path, _ in plans:
            info.latents_npz = path
    return n


def _encode_latents(work, encode, to_disk: bool, batch_size: int, show_progress: bool) -> int:
    # batches never mix buckets: one VAE call needs one image size
    batches: list[list] = []
    for item in work:
        if batches and len(batches[-1]) < batch_size and batches[-1][0][0].bucket_reso == item[0].bucket_reso:
            batches[-1].append(item)
        else:
            batches.append([item])
    for batch in tqdm(batches, desc="caching latents", disable=not show_progress or not batches):
        infos = [b[0] for b in batch]
        images, masks = _load_bucket_images(infos)
        with torch.no_grad():
            lat = encode(images).float().cpu()
            flip = any(i.subset.flip_aug for i in infos)
            lat_f = encode(torch.flip(images, dims=[3])).float().cpu() if flip else None
        for k, (info, path, fp) in enumerate(batch):
            if torch.isnan(lat[k]).any() or (lat_f is not None and torch.isnan(lat_f[k]).any()):
                raise RuntimeError(f"NaN in latents of {info.path}; the VAE may need fp32 (--no_half_vae)")
            crop = get_crop_ltrb(info.bucket_reso, info.image_size)
            if to_disk:
                arrays = {
                    "latents": lat[k].numpy(),
                    "original_size": np.array(info.image_size),
                    "crop_ltrb": np.array(crop),
                    FINGERPRINT_KEY: np.array(fp),
                }
                if lat_f is not None and info.subset.flip_aug:
                    arrays["latents_flipped"] = lat_f[k].numpy()
                if masks[k] is not None:
                    arrays["alpha_mask"] = masks[k].numpy()
                save_npz_atomic(path, arrays)
            else:
                info.latents = lat[k].clone()
                info.latents_flipped = (
                    lat_f[k].clone() if lat_f is not None and info.subset.flip_aug else None
                )
                info.latents_original_size = info.image_size
                info.latents_crop_ltrb = crop
                info.alpha_mask = masks[k]
    return len(work)


def cache_text_encoder_outputs(
    group: DatasetGroup,
    encode_text: TextEncoder,
    *,
    to_disk: bool,
    batch_size: int = 8,
    suffix: str = "_te_outputs",
    skip_cache_check: bool = False,
    settings: str = "",
    process_index: int = 0,
    num_processes: int = 1,
    wait_for_everyone: Callable[[], Any] | None = None,
    allow_caption_dropout: bool = False,
    show_progress: bool = True,
) -> int:
    """Encode each image's caption once; returns how many captions were encoded.

    `encode_text(captions)` returns {name: Tensor(B, ...)}; the names become the npz keys (e.g. SDXL
    `hidden_state1`, `hidden_state2`, `pool2`). Floating tensors are stored as float32 on disk.
    """
    check_te_cache_compat(group, allow_caption_dropout)
    plans = []
    for info in sorted(group.image_infos(), key=lambda i: i.key):
        cap = deterministic_caption(info.caption, caption_options(info.subset))
        plans.append((info, te_npz_path(info.path, suffix), te_fingerprint(cap, settings), cap))
    if to_disk:
        _check_unique_paths([(i, p, f) for i, p, f, _ in plans])
        todo, seen = [], set()
        for info, path, fp, cap in plans:
            if path not in seen and not _te_valid(path, fp, skip_cache_check):
                todo.append((info, path, fp, cap))
            seen.add(path)
        work = _share(todo, process_index, num_processes)
    else:
        work = plans
    chunks = [work[i : i + batch_size] for i in range(0, len(work), batch_size)]
    for chunk in tqdm(chunks, desc="caching text encoder outputs", disable=not show_progress or not chunks):
        with torch.no_grad():
            out = encode_text([c[3] for c in chunk])
        for k, (info, path, fp, _) in enumerate(chunk):
            row = {name: t[k].detach().cpu() for name, t in out.items()}
            if to_disk:
                arrays = {n: (t.float() if t.is_floating_point() else t).numpy() for n, t in row.items()}
                arrays[FINGERPRINT_KEY] = np.array(fp)
                save_npz_atomic(path, arrays)
            else:
                info.te_outputs = {n: t.clone() for n, t in row.items()}
    if to_disk:
        if wait_for_everyone is not None:
            wait_for_everyone()
        for info, path, _, _ in plans:
            info.te_npz = path
    return len(work)


def _te_valid(path: Path, fp: str, skip_check: bool) -> bool:
    # the caller's keys are unknown here; a matching fingerprint proves the file was fully written by us
    return npz_is_valid(path, [], fp, skip_check)


def prepare_caches(
    group: DatasetGroup,
    args: Any,
    *,
    encode_latents: LatentEncoder | None = None,
    encode_text: TextEncoder | None = None,
    latents_suffix: str = "_sdxl",
    te_suffix: str = "_te_outputs",
    latents_settings: str = "",
    te_settings: str = "",
    te_batch_size: int | None = None,
    accelerator: Any = None,
    allow_caption_dropout: bool = False,
) -> dict[str, int]:
    """Run the caches the flags ask for; returns {"latents": n_encoded, "text": n_encoded}.

    `accelerator` (optional, accelerate.Accelerator) splits disk-cache work across processes and
    synchronises them. `*_settings` are strings describing the encoder (model path, dtype, ...): a change
    invalidates existing disk caches.
    """
    pi = accelerator.process_index if accelerator is not None else 0
    np_ = accelerator.num_processes if accelerator is not None else 1
    wait = accelerator.wait_for_everyone if accelerator is not None else None
    show = accelerator.is_local_main_process if accelerator is not None else True
    skip = bool(getattr(args, "skip_cache_check", False))
    out = {"latents": 0, "text": 0}
    lat, lat_disk = wants_latent_cache(args)
    if lat:
        if encode_latents is None:
            raise ValueError("latent caching was requested but no encode_latents callable was given")
        out["latents"] = cache_latents(
            group,
            encode_latents,
            to_disk=lat_disk,
            vae_batch_size=int(getattr(args, "vae_batch_size", 1) or 1),
            suffix=latents_suffix,
            skip_cache_check=skip,
            settings=latents_settings,
            process_index=pi,
            num_processes=np_,
            wait_for_everyone=wait,
            show_progress=show,
        )
    te, te_disk = wants_te_cache(args)
    if te:
        if encode_text is None:
            raise ValueError(
                "text-encoder output caching was requested but no encode_text callable was given"
            )
        out["text"] = cache_text_encoder_outputs(
            group,
            encode_text,
            to_disk=te_disk,
            batch_size=te_batch_size or int(getattr(args, "vae_batch_size", 1) or 1),
            suffix=te_suffix,
            skip_cache_check=skip,
            settings=te_settings,
            process_index=pi,
            num_processes=np_,
            wait_for_everyone=wait,
            allow_caption_dropout=allow_caption_dropout,
            show_progress=show,
        )
    return out
