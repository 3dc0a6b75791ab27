"""SDXL text-to-image with LoRA / LoHa / LoKr networks: the command line of sd-scripts' `gen_img.py`.

    python gen_img.py --ckpt sdxl.safetensors --network_module networks.loha \
        --network_weights my_loha.safetensors --prompt "a cat --n blurry --d 42" --outdir out

Models load through the trainer's loader (`library.sdxl.loading`); networks go through the module's
`create_network_from_weights(..., for_inference=True)` and are either merged into the weights once
(`--network_merge`) or applied as modules whose multiplier can change per prompt (`--am`).
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from library.inference.network_loading import LoadedNetwork, NetworkRequest
from library.inference.network_loading import load_networks as load_sdxl_networks
from library.inference.planning import (
    ImageJob,
    job_key,
    parse_prompt_lines,
    plan_iteration,
    seed_source,
    split_batches,
    verify_sampler,
)
from library.io.console import setup_logging
from library.io.png_metadata import (
    NetworkRecord,
    SdxlSizeConditioning,
    first_available_name,
    image_text_metadata,
    save_png,
    sequential_name,
    timestamped_name,
)
from networks.block_weights import sdxl_per_network
from networks.fp8 import apply_fp8_base, cast_keeping_fp8
from networks.network_args import split_semicolon_args as parse_network_kwargs

logger = logging.getLogger("gen_img")

# sd-scripts gen_img flags this project does not implement. "error": refuse (ignoring would change the
# images); "warn": accept with one warning (speed/memory knobs, or behaviour that is already ours).
UNSUPPORTED: dict[str, tuple[str, str]] = {
    "v1": ("error", "only SDXL is supported (--v1 is for SD1.x checkpoints)"),
    "v2": ("error", "only SDXL is supported (--v2 is for SD2.x checkpoints)"),
    "v_parameterization": ("error", "v-prediction SDXL models are not supported by this generator"),
    "interactive": ("error", "--interactive is not implemented; use --prompt or --from_file"),
    "from_module": ("error", "--from_module is not implemented; use --prompt or --from_file"),
    "image_path": ("error", "img2img/inpainting (--image_path) is not implemented"),
    "mask_path": ("error", "inpainting (--mask_path) is not implemented"),
    "highres_fix_scale": ("error", "highres fix is not implemented"),
    "textual_inversion_embeddings": ("error", "textual inversion embeddings are not implemented"),
    "control_net_lllite_models": ("error", "ControlNet-LLLite is not implemented"),
    "network_pre_calc": ("warn", "--network_pre_calc: use --network_merge (merged once, same result)"),
    "xformers": ("warn", "--xformers is ignored: attention uses PyTorch SDPA"),
    "diffusers_xformers": ("warn", "--diffusers_xformers is ignored: attention uses PyTorch SDPA"),
    "mem_eff_attn": ("warn", "--mem_eff_attn is ignored: attention uses PyTorch SDPA"),
    "opt_channels_last": ("warn", "--opt_channels_last is ignored"),
    "vae_slices": ("warn", "--vae_slices is ignored (the VAE decodes whole images)"),
    "no_preview": ("warn", "--no_preview has no effect (no preview window)"),
}


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="SDXL image generation with LoRA/LoHa/LoKr networks (sd-scripts gen_img.py flags)"
    )
    a = p.add_argument
    # model
    a("--ckpt", type=str, default=None, help="SDXL single-file .safetensors or diffusers folder")
    a("--vae", type=str, default=None, help="VAE file or folder replacing the checkpoint's VAE")
    a("--sdxl", action="store_true", help="accepted for compatibility: the model is always SDXL")
    a("--v1", action="store_true")
    a("--v2", action="store_true")
    a("--v_parameterization", action="store_true")
    a("--tokenizer_dir", type=str, default=None, help="local CLIP tokenizer folder (offline)")
    a("--tokenizer_cache_dir", type=str, default=None, help="alias of --tokenizer_dir")
    a("--fp16", action="store_true", help="run the models in float16")
    a("--bf16", action="store_true", help="run the models in bfloat16")
    a("--no_half_vae", action="store_true", help="keep the VAE in float32 under --fp16/--bf16")
    a("--fp8_base", action="store_true", help="store U-Net and text-encoder Linear/Conv2d weights as fp8")
    a("--fp8_scaled", action="store_true", help="fp8 weights with one scale per output channel")
    a("--xformers", action="store_true")
    a("--sdpa", action="store_true", help="PyTorch SDPA attention (always used)")
    a("--diffusers_xformers", action="store_true")
    a("--mem_eff_attn", action="store_true")
    a("--opt_channels_last", action="store_true")
    a("--vae_batch_size", type=float, default=None, help="accepted; the VAE decodes per batch")
    a("--vae_slices", type=int, default=None)
    a(
        "--clip_skip",
        type=int,
        default=None,
        help="SDXL always uses the penultimate layer (2); other values error",
    )
    a("--max_embeddings_multiples", type=int, default=None, help="prompt length in 75-token windows (1-3)")
    a("--emb_normalize_mode", type=str, default="original", choices=["original", "abs", "none"],
      help="how (text:1.2) / [text] weights rescale the prompt embedding (sd-scripts default: original)")  # fmt: skip
    a("--device", type=str, default=None, help="torch device (default: cuda if available, else cpu)")
    # prompts and sampling
    a("--prompt", type=str, default=None, help="prompt, may carry inline options (--n, --d, ...)")
    a("--from_file", type=str, default=None, help="text file: one prompt per line, '#' comments")
    a("--from_module", type=str, default=None)
    a("--interactive", action="store_true")
    a("--no_preview", action="store_true")
    a("--image_path", type=str, default=None)
    a("--mask_path", type=str, default=None)
    a("--highres_fix_scale", type=float, default=None)
    a("--textual_inversion_embeddings", type=str, nargs="*", default=None)
    a("--control_net_lllite_models", type=str, nargs="*", default=None)
    a("--images_per_prompt", type=int, default=1, help="images per prompt line")
    a("--n_iter", type=int, default=1, help="repeat the whole prompt list this often")
    a("--batch_size", type=int, default=1, help="images per denoising batch")
    a("--steps", type=int, default=50, help="sampling steps")
    a("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    a("--negative_scale", type=float, default=None, help="not implemented: must stay unset")
    a("--sampler", type=str, default="ddim", help="ddim, euler, euler_a, dpmsolver++, k_dpm_2, ...")
    a("--W", type=int, default=None, help="image width (SDXL default 1024)")
    a("--H", type=int, default=None, help="image height (SDXL default 1024)")
    a("--original_width", type=int, default=None, help="SDXL size conditioning (default: W)")
    a("--original_height", type=int, default=None, help="SDXL size conditioning (default: H)")
    a("--original_width_negative", type=int, default=None, help="default: original width")
    a("--original_height_negative", type=int, default=None, help="default: original height")
    a("--crop_top", type=int, default=None, help="SDXL crop conditioning (default 0)")
    a("--crop_left", type=int, default=None, help="SDXL crop conditioning (default 0)")
    a("--seed", type=int, default=None, help="seed of the per-image seeds (used as is for a single image)")
    a("--iter_same_seed", action="store_true", help="one seed per iteration for prompts without --d")
    a("--shuffle_prompts", action="store_true", help="shuffle the prompt list each iteration")
    a("--outdir", type=str, default="outputs", help="output folder")
    a("--sequential_file_name", action="store_true", help="name images im_000001.png, ...")
    # networks
    a(
        "--network_module",
        type=str,
        nargs="*",
        default=None,
        help="one module per network, e.g. networks.loha",
    )
    a("--network_weights", type=str, nargs="*", default=None, help="one weights file per network")
    a("--network_mul", type=float, nargs="*", default=None, help="one multiplier per network (default 1.0)")
    a("--network_args", type=str, nargs="*", default=None, help='one string per network: "k=v;k2=v2"')
    a("--network_block_weights", type=str, nargs="*", default=None,
      help='one per network: 12 or 20 comma-separated per-block multipliers (BASE,IN04,...,OUT05), "" for none; docs/block_weights.md')  # fmt: skip
    a("--network_show_meta", action="store_true", help="log each weights file's metadata")
    a("--network_merge", action="store_true", help="merge all networks into the weights once")
    a("--network_merge_n_models", type=int, default=None, help="merge only the first N networks")
    a("--network_pre_calc", action="store_true")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = setup_parser()
    args = parser.parse_args(argv)  # unknown flags: argparse prints "unrecognized arguments" and exits 2
    try:
        verify_args(args)
    except ValueError as e:
        parser.error(str(e))
    return args


def verify_args(args: argparse.Namespace) -> None:
    """Reject inconsistent or unsupported arguments before any model is loaded (one error each)."""
    defaults = vars(setup_parser().parse_args([]))
    for name, (action, reason) in UNSUPPORTED.items():
        if getattr(args, name) != defaults[name]:
            if action == "error":
                raise ValueError(f"--{name}: {reason}")
            logger.warning(reason)
    if args.ckpt is None:
        raise ValueError("--ckpt is required (SDXL .safetensors file or diffusers folder)")
    if not os.path.exists(args.ckpt):  # sd-scripts accepts a pattern that matches exactly one path
        matches = glob.glob(args.ckpt)
        if len(matches) == 1:
            args.ckpt = matches[0]
        elif len(matches) > 1:
            raise ValueError(
                f"--ckpt {args.ckpt!r} matches {len(matches)} paths; give one: {sorted(matches)[:5]}"
            )
    if os.path.exists(args.outdir) and not os.path.isdir(args.outdir):
        raise ValueError(f"--outdir {args.outdir} exists and is not a folder")
    if args.prompt is None and args.from_file is None:
        raise ValueError("give --prompt or --from_file")
    if args.prompt is not None and args.from_file is not None:
        raise ValueError("give only one of --prompt and --from_file")
    if args.fp16 and args.bf16:
        raise ValueError("--fp16 and --bf16 are exclusive")
    for name in ("images_per_prompt", "n_iter", "batch_size", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.negative_scale is not None:
        raise ValueError("--negative_scale is not implemented (the negative prompt uses --scale)")
    if args.clip_skip not in (None, 2):
        raise ValueError(f"--clip_skip {args.clip_skip}: SDXL uses the penultimate layer only (2)")
    if args.max_embeddings_multiples not in (None, 1, 2, 3):
        raise ValueError(f"--max_embeddings_multiples must be 1, 2 or 3, got {args.max_embeddings_multiples}")
    for name in ("W", "H"):
        v = getattr(args, name)
        if v is not None and v < 8:
            raise ValueError(f"--{name} must be >= 8 pixels, got {v}")
    verify_sampler(args.sampler, "--sampler")
    verify_network_args(args)


def verify_network_args(args: argparse.Namespace) -> None:
    modules = args.network_module or []
    weights = args.network_weights or []
    n = len(modules)
    if n == 0:
        if (
            weights
            or args.network_mul
            or args.network_args
            or args.network_block_weights
            or args.network_merge
            or args.network_merge_n_models
        ):
            raise ValueError("network options given without --network_module")
        return
    if len(weights) != n:
        raise ValueError(
            f"--network_module lists {n} network(s) but --network_weights lists {len(weights)} file(s); "
            "give exactly one weights file per module"
        )
    if args.network_mul is not None and len(args.network_mul) != n:
        raise ValueError(
            f"--network_mul lists {len(args.network_mul)} value(s) for {n} network(s); "
            "give one multiplier per network (or none for 1.0)"
        )
    if args.network_args is not None and len(args.network_args) != n:
        raise ValueError(
            f'--network_args lists {len(args.network_args)} string(s) for {n} network(s); give one "k=v;k2=v2" per network'
        )
    sdxl_per_network("--network_block_weights", args.network_block_weights, n)
    for w in weights:
        if not Path(w).is_file():
            raise ValueError(
                f"--network_weights: file {w!r} does not exist (expected a .safetensors network file)"
            )
    if args.network_merge_n_models is not None and not 0 <= args.network_merge_n_models <= n:
        raise ValueError(
            f"--network_merge_n_models must be between 0 and {n}, got {args.network_merge_n_models}"
        )


# ------------------------------------------------------------------------------------------ networks


def load_networks(
    args: argparse.Namespace, models: Any, dtype: torch.dtype, device: torch.device
) -> list[LoadedNetwork]:
    """Create each network from its file; merge it (`--network_merge[_n_models]`) or apply it live."""
    modules = args.network_module or []
    n_merge = 0
    if args.network_merge:
        n_merge = len(modules)
    if args.network_merge_n_models is not None:
        n_merge = args.network_merge_n_models
    block_weights = sdxl_per_network("--network_block_weights", args.network_block_weights, len(modules))
    requests = [
        NetworkRequest(
            module_name,
            args.network_weights[i],
            1.0 if args.network_mul is None else float(args.network_mul[i]),
            parse_network_kwargs(args.network_args[i] if args.network_args else None),
            block_weights[i],
        )
        for i, module_name in enumerate(modules)
    ]
    return load_sdxl_networks(requests, models, n_merge, args.network_show_meta, dtype, device)


# ------------------------------------------------------------------------------------------ running


def pick_dtype(args: argparse.Namespace) -> torch.dtype:
    return torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32


def pick_device(args: argparse.Namespace) -> torch.device:
    if args.device:
        return torch.device(args.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_models(args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> Any:
    """The trainer's loader: single-file SGM checkpoint or diffusers folder, optional --vae."""
    from library.sdxl.loading import load_sdxl_models

    # fp8: quantized from the stored weights (quantize widens them to fp32 itself: one rounding, and no fp32
    # copy of the model on the host), the rest then cast to dtype
    use_fp8 = args.fp8_base or args.fp8_scaled
    models = load_sdxl_models(
        args.ckpt, vae=args.vae, tokenizer_dir=args.tokenizer_dir or args.tokenizer_cache_dir,
        dtype=None if use_fp8 else dtype,
    )  # fmt: skip
    for m in (models.unet, models.text_encoder_1, models.text_encoder_2):
        if use_fp8:
            apply_fp8_base(m, args.fp8_scaled)
            cast_keeping_fp8(m, device, dtype)
        m.to(device)
    # the SDXL VAE overflows in fp16; keep it fp32 there, as sd-scripts users pass --no_half_vae for
    vae_dtype = torch.float32 if (args.no_half_vae or dtype == torch.float16) else dtype
    models.vae.to(device=device, dtype=vae_dtype)
    return models


def _network_records(nets: list[LoadedNetwork], muls: tuple[float, ...] | None) -> list[NetworkRecord]:
    live = iter(muls) if muls is not None else None
    records = []
    for n in nets:
        m = n.multiplier
        if not n.merged and live is not None:
            m = next(live)
        records.append(NetworkRecord(n.module_name, Path(n.weights_path).name, float(m), n.merged))
    return records


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor) -> list[Any]:
    """Final latents -> PIL images through a VAE of its own dtype (SDXL: no latent mean/shift)."""
    from diffusers.image_processor import VaeImageProcessor

    x = vae.decode(latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor).sample
    return VaeImageProcessor().postprocess(x.float(), output_type="pil")


def run_batch(
    args: argparse.Namespace,
    models: Any,
    nets: list[LoadedNetwork],
    batch: list[ImageJob],
    dtype: torch.dtype,
    device: torch.device,
    counter: list[int],
) -> list[Path]:
    from library.sdxl.generate import generate_sdxl

    k = batch[0].key
    # a VAE kept in another precision than the UNet (--no_half_vae) is decoded here
    separate_vae = models.vae.dtype != dtype
    live = [n for n in nets if not n.merged]
    muls = k.network_muls if k.network_muls is not None else tuple(n.multiplier for n in live)
    for n, m in zip(live, muls):
        n.network.set_multiplier(m)
    images = generate_sdxl(
        models,
        [j.prompt for j in batch],
        [j.negative_prompt for j in batch],
        k.width,
        k.height,
        k.steps,
        k.scale,
        [j.seed for j in batch],
        k.sampler,
        original_size=(k.original_height, k.original_width),
        negative_original_size=(k.original_height_negative, k.original_width_negative),
        crop_top_left=(k.crop_top, k.crop_left),
        max_token_length=None if not args.max_embeddings_multiples else 75 * args.max_embeddings_multiples,
        dtype=dtype,
        device=device,
        output_type="latent" if separate_vae else "pil",
        emb_normalize_mode=args.emb_normalize_mode,
        show_progress=True,
        progress_desc=_batch_label(counter[0], len(batch)),
    )
    if separate_vae:
        images = decode_latents(models.vae, images)
    cond = SdxlSizeConditioning(
        k.original_width,
        k.original_height,
        k.original_width_negative,
        k.original_height_negative,
        k.crop_top,
        k.crop_left,
    )
    records = _network_records(nets, muls if live else None)
    ts = time.strftime("%Y%m%d%H%M%S", time.localtime())
    written = []
    outdir = Path(args.outdir)
    for i, (job, image) in enumerate(zip(batch, images)):
        counter[0] += 1
        if job.filename is not None:
            name = first_available_name(outdir, job.filename)
        elif args.sequential_file_name:
            name = sequential_name(counter[0])
        else:
            # same second, index and seed (e.g. --d 5 for several images) must not overwrite: add _1, _2
            name = first_available_name(outdir, timestamped_name(ts, i, job.seed))
        text = image_text_metadata(
            prompt=job.prompt,
            seed=job.seed,
            sampler=k.sampler,
            steps=k.steps,
            scale=k.scale,
            negative_prompt=job.negative_prompt,
            raw_prompt=job.raw_prompt,
            size_conditioning=cond,
            networks=records,
        )
        written.append(save_png(image, outdir / name, text))
    return written


def _size_step(models: Any) -> int:
    """Pixels per latent cell times the U-Net's total downsampling (SDXL: 8 * 4 = 32)."""
    vae_levels = len(models.vae.config.block_out_channels) - 1
    unet_levels = len(models.unet.config.block_out_channels) - 1
    return 2**vae_levels * 2**unet_levels


def _batch_label(done: int, n: int) -> str:
    """Progress-bar label of a batch: the number(s) of the image(s) it makes in this run."""
    return f"image {done + 1}" if n == 1 else f"images {done + 1}-{done + n}"


def generate(args: argparse.Namespace) -> list[Path]:
    """Everything after argument parsing; returns the written image paths."""
    parsed = parse_prompt_lines(args)  # prompt errors surface before minutes of model loading
    dtype, device = pick_dtype(args), pick_device(args)
    models = load_models(args, dtype, device)
    nets = load_networks(args, models, dtype, device)
    n_live = sum(not n.merged for n in nets)
    size_step = _size_step(models)
    for o in parsed:  # --am and sizes: check every line now, not after the first images
        job_key(args, o, n_live, size_step)
    rng = seed_source(args, len(parsed))
    variant_rng = random.Random(args.seed)  # dynamic-prompt picks: reproducible under --seed
    counter = [0]
    written: list[Path] = []
    Path(args.outdir).mkdir(parents=True, exist_ok=True)
    for it in range(args.n_iter):
        logger.info("iteration %d/%d", it + 1, args.n_iter)
        for batch in split_batches(
            plan_iteration(args, parsed, rng, n_live, size_step, variant_rng), args.batch_size
        ):
            written.extend(run_batch(args, models, nets, batch, dtype, device, counter))
    logger.info("wrote %d image(s) to %s", len(written), args.outdir)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 done, 2 bad input (one ``gen_img.py: error:`` line), 130 Ctrl-C, 70 internal error."""
    from library.io.errors import cli_status

    setup_logging()
    return cli_status(lambda: generate(parse_args(argv)), "gen_img.py", input_status=2)


if __name__ == "__main__":
    sys.exit(main())
