"""Merge LoRA / LoHa / LoKr files (any mix) into an SDXL checkpoint and save it as an SGM single file.

    python networks/sdxl_merge_lora.py --sd_model sdxl.safetensors --save_to merged.safetensors \
        --models style.safetensors char_lokr.safetensors --ratios 1.0 0.6 --save_precision fp16

Each module's ΔW is computed as training and inference compute it (α/r included) and added in fp32:
W ← W + ratio·ΔW, cast once to `--precision`, the dtype the model is held in while merging; the file is
saved in `--save_precision`.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: the project root (not networks/) must be importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from library.tools.checkpoint_merge import merge_network_files  # noqa: E402
from library.tools.tool_cli import OneLineParser, ToolError, parse_ratios, run_tool  # noqa: E402
from networks.block_weights import sdxl_per_network  # noqa: E402

DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_parser(prog: str, model_flag: str, model_help: str) -> OneLineParser:
    p = OneLineParser(prog=prog, description=(sys.modules[__name__].__doc__ or "").split("\n")[0])
    p.add_argument(model_flag, required=True, help=model_help)
    p.add_argument("--save_to", required=True, help="output .safetensors")
    p.add_argument("--models", nargs="+", required=True, help="network files: LoRA, LoHa, LoKr (mixed)")
    p.add_argument("--ratios", type=float, nargs="+", help="one multiplier per file (default 1.0 each)")
    p.add_argument(
        "--block_weights",
        nargs="+",
        metavar="WEIGHTS",
        help='per-block strength, one comma-separated string per file ("" for none); docs/block_weights.md',
    )
    p.add_argument(
        "--precision", choices=tuple(DTYPES), default="float", help="dtype while merging (default float)"
    )
    p.add_argument(
        "--save_precision", choices=tuple(DTYPES), help="dtype of the saved file (default: --precision)"
    )
    return p


def check_paths(model: str, flag: str, save_to: str, files: list[str]) -> None:
    if not Path(model).exists():
        raise ToolError(f"{flag} {model}: does not exist")
    if Path(save_to).suffix != ".safetensors":
        raise ToolError(f"--save_to {save_to}: expected a .safetensors path")
    if Path(save_to).resolve() == Path(model).resolve():
        raise ToolError(f"--save_to {save_to}: the same file as {flag}; write the merged model to a new file")
    for f in files:
        if not Path(f).is_file():
            raise ToolError(f"--models {f}: does not exist (expected a .safetensors network file)")


def main(argv: list[str] | None = None) -> int:
    from library.sdxl.loading import SdxlModels, load_sdxl_single_file, save_sdxl_single_file

    a = build_parser(
        "sdxl_merge_lora.py", "--sd_model", "SDXL checkpoint (SGM single .safetensors)"
    ).parse_args(argv)
    check_paths(a.sd_model, "--sd_model", a.save_to, a.models)
    ratios = parse_ratios("--ratios", a.ratios, len(a.models))
    block_weights = sdxl_per_network("--block_weights", a.block_weights, len(a.models), "files")
    try:
        parts = load_sdxl_single_file(a.sd_model, DTYPES[a.precision])
    except (ValueError, KeyError, OSError) as e:
        raise ToolError(f"--sd_model {a.sd_model}: {e.args[0] if e.args else e}") from None
    models = SdxlModels(
        parts["unet"],
        parts["vae"],
        parts["text_encoder_1"],
        parts["text_encoder_2"],
        None,
        None,
        parts["extra"],
    )
    for line in merge_network_files(
        models.text_encoders, models.unet, a.models, ratios, block_weights=block_weights
    ):
        print(line)
    save_dtype = DTYPES[a.save_precision or a.precision]
    for m in (models.unet, models.vae, *models.text_encoders):
        m.to(save_dtype)  # cast in place, one tensor at a time: saving then makes no second copy
    save_sdxl_single_file(models, a.save_to, save_dtype)
    print(f"wrote {a.save_to}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool("sdxl_merge_lora.py", main))
