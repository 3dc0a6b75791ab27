"""Anima text-to-image with statically merged LoRA / LoHa / LoKr files (sd-scripts flags).

    python anima_minimal_inference.py --dit dit.safetensors --vae vae.safetensors \
        --text_encoder qwen3_06b --prompt "a cat" --image_size 1024 1024 \
        --lora_weight a.safetensors b.safetensors --lora_multiplier 1.0 0.6 --save_path out

Every file is merged into the weights in fp32 (algorithm detected per module from its keys);
the script reports how many modules each file matched and stops if a file matches nothing,
so a wrong file never yields a silently unchanged image.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from library.anima.sampling import check_image_size, euler_sample, initial_noise, latents_to_pil
from library.inference.lora_merge import MergeReport, group_by_module, looks_like_sdxl, merge_into_modules
from library.io.console import setup_logging
from networks.block_weights import BlockWeights, anima_per_file, check_anima_syntax
from networks.tensor_files import read_tensors

logger = logging.getLogger("anima_minimal_inference")

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Anima minimal inference with LoRA/LoHa/LoKr merging")
    p.add_argument("--dit", required=True, help="Anima DiT single file (net. prefix)")
    p.add_argument("--vae", required=True, help="Qwen-Image VAE (Wan or diffusers key names)")
    p.add_argument("--text_encoder", required=True, help="Qwen3-0.6B folder or single safetensors file")
    p.add_argument(
        "--t5_tokenizer_path", default=None, help="T5 tokenizer folder (default: the bundled T5 tokenizer)"
    )
    p.add_argument(
        "--qwen3_tokenizer_path",
        default=None,
        help="Qwen3 tokenizer folder (default: the --text_encoder folder if it has one, else the bundled one)",
    )
    p.add_argument("--lora_weight", nargs="*", default=[], help="LoRA/LoHa/LoKr files, applied in order")
    p.add_argument(
        "--lora_multiplier", nargs="*", type=float, default=None, help="one per file (default 1.0)"
    )
    p.add_argument(
        "--lora_block_weights",
        nargs="*",
        default=None,
        help="one per --lora_weight file: comma-separated multipliers for the text encoder, the LLM adapter, "
        'then each DiT block (30 values for the 28-block model), "" for none; docs/block_weights.md',
    )
    p.add_argument("--include_patterns", nargs="*", default=None, help="accepted, unused (as sd-scripts)")
    p.add_argument("--exclude_patterns", nargs="*", default=None, help="accepted, unused (as sd-scripts)")
    p.add_argument(
        "--lycoris", action="store_true", help="accepted; LoHa/LoKr are detected from the keys anyway"
    )
    p.add_argument("--prompt", default=None)
    p.add_argument("--negative_prompt", default="")
    p.add_argument("--guidance_scale", type=float, default=3.5)
    p.add_argument("--image_size", type=int, nargs=2, default=[1024, 1024], metavar=("HEIGHT", "WIDTH"))
    p.add_argument("--infer_steps", type=int, default=50)
    p.add_argument("--flow_shift", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--save_path", required=True, help="output folder")
    p.add_argument("--output_type", choices=["images", "latent", "latent_images"], default="images")
    p.add_argument("--no_metadata", action="store_true")
    p.add_argument("--latent_path", default=None, help="decode this saved latent instead of sampling")
    p.add_argument(
        "--from_file", default=None, help="prompt file, one prompt per line (--w --h --d --s --g --fs --n)"
    )
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16", help="model dtype (default bf16)")
    p.add_argument("--text_encoder_cpu", action="store_true", help="run Qwen3 on the CPU")
    p.add_argument("--fp8", action="store_true", help="store the DiT's Linear weights as float8_e4m3fn")
    p.add_argument(
        "--fp8_scaled", action="store_true", help="fp8 DiT weights with one scale per output channel"
    )
    p.add_argument(
        "--attn_mode", default="torch", choices=["torch", "sdpa"], help="attention kernel (torch SDPA)"
    )
    p.add_argument(
        "--max_token_length", type=int, default=512, help="Qwen3/T5 token length (512 as released)"
    )
    return p


@dataclass
class Job:
    prompt: str
    negative_prompt: str
    height: int
    width: int
    steps: int
    guidance_scale: float
    flow_shift: float
    seed: int


def _parse_prompt_line(line: str, base: Job) -> Job:
    """`prompt --w 512 --h 512 --d 1 --s 30 --g 4 --fs 3 --n neg` (sd-scripts per-line options)."""
    parts = line.split(" --")
    job = Job(**{**base.__dict__, "prompt": parts[0].strip()})
    for opt in parts[1:]:
        name, _, value = opt.strip().partition(" ")
        value = value.strip()
        try:
            if name == "w":
                job.width = int(value)
            elif name == "h":
                job.height = int(value)
            elif name == "d":
                job.seed = int(value)
            elif name == "s":
                job.steps = int(value)
            elif name in ("g", "l"):
                job.guidance_scale = float(value)
            elif name == "fs":
                job.flow_shift = float(value)
            elif name == "n":
                job.negative_prompt = value
            else:
                raise ValueError(f"unknown option --{name}")
        except ValueError as e:
            raise ValueError(f"--from_file line {line!r}: bad option --{opt.strip()}: {e}") from None
    return job


def read_prompt_lines(path: str) -> list[str]:
    """`--from_file` lines: stripped, blank and `#` lines skipped; a UTF-8 BOM is dropped."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--from_file: {p} does not exist (a text file, one prompt per line)")
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8-sig").splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def read_lora_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Load a LoRA file in sd-scripts names; ComfyUI names are converted; SDXL files are refused."""
    p = Path(path)
    if not p.is_file() and not p.is_dir():
        raise FileNotFoundError(f"--lora_weight: file not found: {p}")
    sd = read_tensors(p, "--lora_weight", allow_torch=False, expected="a LoRA .safetensors file")[0]
    if not sd:
        raise ValueError(f"--lora_weight {p}: the file holds no tensors")
    if looks_like_sdxl(sd):
        raise ValueError(
            f"--lora_weight {p}: this is an SDXL LoRA (keys such as lora_te1_/lora_unet_input_blocks_), "
            "not an Anima one; it cannot be applied to Anima"
        )
    if any(k.startswith(("diffusion_model.", "text_encoders.")) for k in sd):
        from networks.convert_anima_lora_to_comfy import from_comfy

        logger.info("%s uses ComfyUI key names; converting to sd-scripts names", p.name)
        sd = from_comfy(sd)
    if any(k.startswith("lora_te1_") for k in sd) and not any(k.startswith("lora_te2_") for k in sd):
        # LyCORIS (`--network_module lycoris.kohya`) indexes the one Qwen3 encoder as te1
        logger.info("%s names the text encoder lora_te1_; reading it as lora_te_", p.name)
        sd = {
            ("lora_te_" + k[len("lora_te1_") :] if k.startswith("lora_te1_") else k): v for k, v in sd.items()
        }
    return sd


def apply_lora_files(
    dit: torch.nn.Module,
    text_encoder: torch.nn.Module | None,
    paths: list[str],
    multipliers: list[float] | None,
    calc_device: torch.device | str | None = None,
    loaded: dict[str, dict[str, torch.Tensor]] | None = None,
    block_weights: list[BlockWeights | None] | None = None,
) -> list[MergeReport]:
    """Merge each file in order; error if one matches no module, warn on unused keys.

    `loaded` maps a path to its already-read state dict (read once, validated before the models load);
    `block_weights` gives each file's per-block factors (None: plain multiplier).
    """
    mults = list(multipliers or [])
    if len(mults) > len(paths):
        logger.warning("%d multipliers for %d files: the surplus is dropped", len(mults), len(paths))
    mults = (mults + [1.0] * len(paths))[: len(paths)]
    roots = [("lora_unet", dit)] + ([("lora_te", text_encoder)] if text_encoder is not None else [])
    reports = []
    per_file = block_weights or [None] * len(paths)
    for path, m, bw in zip(paths, mults, per_file):
        sd = (loaded or {}).get(path) or read_lora_state_dict(path)
        weight_of = bw.weight_of if bw is not None else None
        rep = merge_into_modules(roots, sd, m, path=path, calc_device=calc_device, weight_of=weight_of)
        if bw is not None:
            logger.info("%s block weights: %s", Path(path).name, bw.summary(group_by_module(sd)))
        if rep.matched == 0:
            sample = ", ".join(sorted(sd)[:3])
            raise ValueError(
                f"--lora_weight {path}: none of its {len(sd)} keys match an Anima module (e.g. {sample}); "
                "expected sd-scripts names like lora_unet_blocks_0_self_attn_q_proj.lora_down.weight"
            )
        algos = ", ".join(f"{n} {a}" for a, n in sorted(rep.by_algo.items()))
        logger.info("%s: merged %d modules (%s) at multiplier %g", Path(path).name, rep.matched, algos, m)
        if rep.unused:
            logger.warning("%s: %d keys unused, e.g. %s", Path(path).name, len(rep.unused), rep.unused[:5])
        reports.append(rep)
    return reports


def load_models(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    from library.anima.loading import (
        AnimaModels,
        load_anima_dit,
        load_anima_tokenizers,
        load_anima_vae,
        load_qwen3_text_encoder,
    )

    te_path = Path(args.text_encoder)
    if not te_path.exists():
        raise FileNotFoundError(
            f"--text_encoder: {te_path} does not exist (a Qwen3 folder or .safetensors file)"
        )
    use_fp8 = args.fp8 or args.fp8_scaled
    # read tensor by tensor into --dtype (fp8 weights quantized from the file's values: one rounding); on the
    # CPU, where the LoRA files are merged in before the move to the device
    dit = load_anima_dit(args.dit, dtype, fp8_base=use_fp8, fp8_scaled=args.fp8_scaled)
    te = load_qwen3_text_encoder(args.text_encoder, dtype)
    vae = load_anima_vae(args.vae, dtype)
    qwen_tok, t5_tok = load_anima_tokenizers(args.qwen3_tokenizer_path, args.t5_tokenizer_path, te_path)
    return AnimaModels(dit=dit, text_encoder=te, vae=vae, qwen_tokenizer=qwen_tok, t5_tokenizer=t5_tok)


def _png_text(job: Job, args: argparse.Namespace) -> dict[str, str]:
    return {
        "prompt": job.prompt,
        "negative-prompt": job.negative_prompt,
        "seed": str(job.seed),
        "steps": str(job.steps),
        "scale": str(job.guidance_scale),
        "flow-shift": str(job.flow_shift),
        "sampler": "flow-euler",
        "size": f"{job.width}x{job.height}",  # width x height, as image viewers and A1111 write it
        "networks": json.dumps(
            [
                {"weights": Path(w).name, "multiplier": m}
                for w, m in zip(args.lora_weight, args.resolved_mults)
            ]
        ),
    }


def _save_png(img, path: Path, text: dict[str, str] | None) -> None:
    from PIL.PngImagePlugin import PngInfo

    from library.io.atomic_io import atomic_write

    info = None
    if text:
        info = PngInfo()
        for k, v in text.items():
            info.add_text(k, v)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG", pnginfo=info))


def run(args: argparse.Namespace) -> list[Path]:
    """Generate every job; returns the written files."""
    if args.include_patterns or args.exclude_patterns:
        logger.warning(
            "--include_patterns/--exclude_patterns are ignored: every module in the files is merged"
        )
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _DTYPES[args.dtype]
    base = Job(
        prompt=args.prompt or "",
        negative_prompt=args.negative_prompt,
        height=args.image_size[0],
        width=args.image_size[1],
        steps=args.infer_steps,
        guidance_scale=args.guidance_scale,
        flow_shift=args.flow_shift,
        seed=args.seed if args.seed is not None else random.randint(0, 2**31 - 1),
    )
    if args.from_file:
        jobs = [_parse_prompt_line(ln, base) for ln in read_prompt_lines(args.from_file)]
    elif args.latent_path:
        jobs = []
    elif args.prompt is None:
        raise ValueError("--prompt is required (or --from_file / --latent_path)")
    else:
        jobs = [base]
    for job in jobs:
        check_image_size(job.height, job.width)
    mults = list(args.lora_multiplier or [])
    args.resolved_mults = (mults + [1.0] * len(args.lora_weight))[: len(args.lora_weight)]
    check_anima_syntax("--lora_block_weights", args.lora_block_weights, len(args.lora_weight))
    # fail on a bad LoRA file before loading gigabytes of weights
    lora_sds = {w: read_lora_state_dict(w) for w in args.lora_weight}

    out_dir = Path(args.save_path)
    models = load_models(args, device, dtype)
    from library.anima.loading import anima_decode_latents
    from library.anima.text import encode_anima_prompts
    from library.io.atomic_io import save_safetensors_atomic

    written: list[Path] = []
    if args.latent_path:
        lat = read_tensors(args.latent_path, "--latent_path", allow_torch=False)[0].get("latent")
        if lat is None:
            raise ValueError(
                f"--latent_path {args.latent_path}: no 'latent' tensor (a file written by --output_type latent)"
            )
        lat = lat.to(device, dtype)
        models.vae.to(device)
        img = latents_to_pil(anima_decode_latents(models.vae, lat))[0]
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / (Path(args.latent_path).stem + ".png")
        _save_png(img, path, None)
        return [path]

    n_blocks = len(models.dit.blocks)
    bws = anima_per_file("--lora_block_weights", args.lora_block_weights, len(args.lora_weight), n_blocks)
    apply_lora_files(
        models.dit,
        models.text_encoder,
        args.lora_weight,
        args.lora_multiplier,
        loaded=lora_sds,
        block_weights=bws,
    )
    del lora_sds
    out_dir.mkdir(parents=True, exist_ok=True)  # only now: bad models or LoRA files leave no empty folder
    te_device = torch.device("cpu") if args.text_encoder_cpu else device
    models.text_encoder.to(te_device)
    models.dit.to(device)
    models.dit.eval()
    models.text_encoder.eval()
    ctx_cache: dict[str, torch.Tensor] = {}

    def context(text: str) -> torch.Tensor:
        # the adapter runs once per distinct prompt (also for the empty negative prompt)
        if text not in ctx_cache:
            with torch.no_grad():
                ctx_cache[text] = encode_anima_prompts(models, [text], max_length=args.max_token_length).to(
                    device, dtype
                )
        return ctx_cache[text]

    stamp = time.strftime("%Y%m%d-%H%M%S")
    for idx, job in enumerate(jobs):
        noise = initial_noise(job.height, job.width, job.seed, dtype).to(device)
        pos, neg = context(job.prompt), context(job.negative_prompt)
        lat = euler_sample(
            models.dit,
            noise,
            pos,
            neg,
            job.steps,
            job.guidance_scale,
            job.flow_shift,
            progress=True,
            progress_desc=f"image {idx + 1}/{len(jobs)}",
        )
        stem = f"{stamp}_{idx:03d}_{job.seed}"
        n_before = len(written)
        if args.output_type in ("latent", "latent_images"):
            lpath = out_dir / f"{stem}_latent.safetensors"
            save_safetensors_atomic(
                {"latent": lat.float().cpu().contiguous()}, lpath, metadata={"prompt": job.prompt}
            )
            written.append(lpath)
        if args.output_type in ("images", "latent_images"):
            models.vae.to(device)
            with torch.no_grad():
                img = latents_to_pil(anima_decode_latents(models.vae, lat))[0]
            path = out_dir / f"{stem}.png"
            _save_png(img, path, None if args.no_metadata else _png_text(job, args))
            written.append(path)
        logger.info("saved %s", ", ".join(str(p) for p in written[n_before:]))
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    setup_logging()
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    from library.io.errors import run_cli

    run_cli(main, input_status=2)
