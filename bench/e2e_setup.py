"""Files for bench/bench_e2e.py: random-init models in the released layouts, and a bucketed dataset.

`real` builds the released configs directly in the file's dtype on the given device (fp16 SDXL, bf16
Anima; no fp32 copy on the host) and writes them with the project's own writers; `tiny` uses the test
configs. The dataset has images at exact bucket sizes around the training area (1024² real, 96² tiny),
so the same buckets come out of our bucketing and sd-scripts'.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

import torch

REAL_SHAPES = [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
               (1536, 640)]  # fmt: skip
# tiny: the same idea at 96² area, sides multiples of 32 (our SDXL bucketing asks for that step)
TINY_SHAPES = [(96, 96), (128, 64), (64, 128), (160, 32), (32, 160), (192, 32), (32, 192), (256, 32)]
BUCKET_KEYS = {  # resolution, min/max bucket side, step: every shape above is one of these buckets
    "real": (1024, 256, 2048, 64),
    "tiny": (96, 32, 256, 32),
}
QWEN_IMAGE_VAE_BASE_DIM = 96
# what transformers 5's save_pretrained writes for a tokenizer; transformers 4 (sd-scripts' pin) cannot read
# its tokenizer_config.json, so the tokenizer folders get the bundled released files instead
SAVED_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                         "chat_template.jinja", "added_tokens.json")  # fmt: skip
# sd-scripts looks for the SDXL tokenizers under --tokenizer_cache_dir by hub name with "/" -> "_"
SDXL_TOKENIZER_DIRS = ("openai_clip-vit-large-patch14", "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k")


def released_tokenizer(name: str, dest: Path, keep: tuple[str, ...] = ()) -> Path:
    """Put the bundled tokenizer `name`'s files as released into dest (created), replacing the ones
    save_pretrained wrote; files named in keep stay as they are (e.g. a tiny model's config.json)."""
    from library.io.bundled_tokenizers import extract_bundled

    dest.mkdir(parents=True, exist_ok=True)
    for name_ in SAVED_TOKENIZER_FILES:
        (dest / name_).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="e2e-tok-") as tmp:
        for f in extract_bundled(name, Path(tmp) / name).iterdir():
            if f.name not in keep:
                shutil.copyfile(f, dest / f.name)
    return dest


@contextlib.contextmanager
def _building(dtype: torch.dtype, device: str):
    """Modules built inside are created in `dtype` on `device`, initialised there."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def write_sdxl(folder: Path, scale: str, device: str, seed: int = 0) -> dict[str, Path]:
    """One SGM single-file fp16 checkpoint and an sd-scripts-style tokenizer cache folder."""
    from library.io.bundled_tokenizers import CLIP
    from library.sdxl import config as sdxl_config
    from library.sdxl.loading import (
        build_sdxl_from_configs,
        build_tiny_sdxl_models,
        load_sdxl_tokenizers,
        save_sdxl_single_file,
    )

    folder.mkdir(parents=True, exist_ok=True)
    ckpt = folder / f"sdxl_{scale}.safetensors"
    tok_dir = folder / "tokenizers"
    if scale == "tiny":
        models = build_tiny_sdxl_models(seed=seed)
    else:
        configs = {"unet": sdxl_config.SDXL_UNET_CONFIG, "text_encoder": sdxl_config.SDXL_TE1_CONFIG,
                   "text_encoder_2": sdxl_config.SDXL_TE2_CONFIG, "vae": sdxl_config.SDXL_VAE_CONFIG}  # fmt: skip
        torch.manual_seed(seed)
        with _building(torch.float16, device):
            models = build_sdxl_from_configs(configs, load_sdxl_tokenizers())
    save_sdxl_single_file(models, ckpt, dtype=torch.float16)
    for name in SDXL_TOKENIZER_DIRS:  # one CLIP vocabulary; tokenizer 2's "!" padding is set by the loaders
        released_tokenizer(CLIP, tok_dir / name)
    return {"ckpt": ckpt, "tokenizers": tok_dir}


def write_anima(folder: Path, scale: str, device: str, seed: int = 0) -> dict[str, Path]:
    """The `net.`-prefixed DiT, a Qwen3 folder (config, weights, tokenizer), the VAE (Wan key names), and
    the T5 tokenizer folder; bf16 at real size."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from library.anima.loading import (
        AnimaModels,
        _vae_from_dims,
        build_tiny_anima_models,
        load_anima_tokenizers,
        save_tiny_anima_files,
    )
    from library.anima.model import Anima, AnimaConfig
    from library.io.bundled_tokenizers import QWEN3, T5, load_bundled

    if scale == "tiny":
        models = build_tiny_anima_models(seed=seed)
    else:
        torch.manual_seed(seed)
        with _building(torch.bfloat16, device):
            dit = Anima(AnimaConfig())
            te_cfg = load_bundled(QWEN3, Qwen3Config.from_pretrained)  # the released model's config.json
            te_cfg._attn_implementation = "sdpa"
            text_encoder = Qwen3ForCausalLM(te_cfg).model
            vae = _vae_from_dims(QWEN_IMAGE_VAE_BASE_DIM, 16)
        models = AnimaModels(dit, text_encoder, vae, *load_anima_tokenizers())
    files = save_tiny_anima_files(models, folder)
    released_tokenizer(QWEN3, files["text_encoder"], keep=("config.json",))
    released_tokenizer(T5, files["t5_tokenizer"])
    return {k: files[k] for k in ("dit", "text_encoder", "vae", "t5_tokenizer")}


def _draw(size: tuple[int, int], index: int):
    """A coloured shape on a plain ground, different for every image."""
    from PIL import Image, ImageDraw

    w, h = size
    colours = [(220, 40, 40), (40, 180, 60), (50, 80, 220), (230, 210, 40), (150, 60, 200), (20, 170, 190)]
    rgb = colours[index % len(colours)]
    img = Image.new("RGB", (w, h), (240 - 7 * (index % 5), 238, 230))
    box = (w // 6 + index % 7, h // 6 + index % 5, w * 5 // 6, h * 5 // 6)
    draw = ImageDraw.Draw(img)
    (draw.ellipse if index % 2 else draw.rectangle)(box, fill=rgb)
    shape = "circle" if index % 2 else "square"
    return img, f"sks toy, a {shape} in colour {index % len(colours)}, picture {index}"


def write_dataset(folder: Path, scale: str, n_images: int, n_shapes: int) -> tuple[Path, list[tuple]]:
    """n_images PNGs with .txt captions, dealt round-robin over the first n_shapes bucket sizes, and a
    dataset TOML (no batch_size: --train_batch_size sets it). Returns (toml path, shapes used)."""
    shapes = (REAL_SHAPES if scale == "real" else TINY_SHAPES)[:n_shapes]
    img_dir = folder / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        img, caption = _draw(shapes[i % len(shapes)], i)
        img.save(img_dir / f"img{i:03d}.png")
        (img_dir / f"img{i:03d}.txt").write_text(caption, encoding="utf-8")
    reso, lo, hi, step = BUCKET_KEYS[scale]
    toml_path = folder / "dataset.toml"
    toml_path.write_text(
        "[general]\n"
        f"resolution = {reso}\n"
        "enable_bucket = true\n"
        f"min_bucket_reso = {lo}\n"
        f"max_bucket_reso = {hi}\n"
        f"bucket_reso_steps = {step}\n"
        'caption_extension = ".txt"\n'
        "shuffle_caption = false\n\n"
        "[[datasets]]\n\n"
        "[[datasets.subsets]]\n"
        f"image_dir = '{img_dir.as_posix()}'\n"
        "num_repeats = 1\n",
        encoding="utf-8",
    )
    return toml_path, shapes
