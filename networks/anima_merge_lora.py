"""Merge LoRA / LoHa / LoKr files (any mix) into the Anima DiT (released `net.` layout) and, optionally, its
Qwen3 text encoder.

    python networks/anima_merge_lora.py --dit anima.safetensors --save_to anima_merged.safetensors \
        --models style.safetensors char.safetensors --ratios 1.0 0.6 \
        [--qwen3 qwen_3_06b.safetensors --save_qwen3_to qwen3_merged.safetensors]

The same maths as sdxl_merge_lora.py (fp32 W + ratio·ΔW, one cast). DiT and LLM-adapter modules go into the
DiT file; text-encoder modules (`lora_te_…`, or LyCORIS' `lora_te1_…`) need --qwen3 and --save_qwen3_to,
or --skip_text_encoder to leave them out. ComfyUI-named files (`diffusion_model.…`) are read too.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: the project root (not networks/) must be importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.tools.checkpoint_merge import merge_network_files  # noqa: E402
from library.tools.file_modules import read_network_file, to_sd_scripts_names  # noqa: E402
from library.tools.tool_cli import ToolError, parse_ratios, run_tool  # noqa: E402
from networks.block_weights import anima_per_file, check_anima_syntax  # noqa: E402
from networks.sdxl_merge_lora import DTYPES, build_parser, check_paths  # noqa: E402

TE_PREFIXES = ("lora_te_", "lora_te1_")


def _lycoris_te(name: str) -> str:
    return "lora_te_" + name[len("lora_te1_") :] if name.startswith("lora_te1_") else name


def _te_modules(files: list[str]) -> dict[str, int]:
    counts = {}
    for f in files:
        sd, _ = read_network_file(f, "--models")
        named, _, _ = to_sd_scripts_names(sd)
        n = len({k.partition(".")[0] for k in named if k.startswith(TE_PREFIXES)})
        if n:
            counts[f] = n
    return counts


def main(argv: list[str] | None = None) -> int:
    from library.anima.loading import load_anima_dit, load_qwen3_text_encoder, save_anima_dit
    from library.io.atomic_io import save_safetensors_atomic

    p = build_parser("anima_merge_lora.py", "--dit", "Anima DiT single file (net. layout)")
    p.description = (__doc__ or "").split("\n")[0]
    p.add_argument(
        "--qwen3", help="Qwen3 text encoder (folder or single file) to merge lora_te_ modules into"
    )
    p.add_argument("--save_qwen3_to", help="output .safetensors for the merged Qwen3 (`model.` keys)")
    p.add_argument(
        "--skip_text_encoder", action="store_true", help="leave the files' text-encoder modules out"
    )
    a = p.parse_args(argv)
    check_paths(a.dit, "--dit", a.save_to, a.models)
    if (a.qwen3 is None) != (a.save_qwen3_to is None):
        raise ToolError("--qwen3 and --save_qwen3_to: give both (merge the text encoder) or neither")
    if a.qwen3 is not None and a.skip_text_encoder:
        raise ToolError("--skip_text_encoder: not with --qwen3 (which merges the text-encoder modules)")
    if a.save_qwen3_to is not None and Path(a.save_qwen3_to).suffix != ".safetensors":
        raise ToolError(f"--save_qwen3_to {a.save_qwen3_to}: expected a .safetensors path")
    ratios = parse_ratios("--ratios", a.ratios, len(a.models))
    check_anima_syntax("--block_weights", a.block_weights, len(a.models))
    te_counts = _te_modules(a.models)
    if te_counts and a.qwen3 is None and not a.skip_text_encoder:
        f, n = next(iter(te_counts.items()))
        raise ToolError(
            f"--models {f}: has {n} text-encoder modules; give --qwen3 and --save_qwen3_to to merge them, "
            "or --skip_text_encoder to leave them out"
        )
    dtype = DTYPES[a.precision]
    try:
        dit = load_anima_dit(a.dit, dtype)
        qwen3 = load_qwen3_text_encoder(a.qwen3, dtype) if a.qwen3 is not None else None
    except (ValueError, KeyError, OSError) as e:
        raise ToolError(f"--dit / --qwen3: {e.args[0] if e.args else e}") from None
    tes = [qwen3] if qwen3 is not None else []
    drop = (lambda key: key.startswith(TE_PREFIXES)) if qwen3 is None else None
    block_weights = anima_per_file("--block_weights", a.block_weights, len(a.models), len(dit.blocks))
    for line in merge_network_files(
        tes, dit, a.models, ratios, rename=_lycoris_te, drop=drop, block_weights=block_weights
    ):
        print(line)
    save_dtype = DTYPES[a.save_precision or a.precision]
    save_anima_dit(dit, a.save_to, save_dtype)
    print(f"wrote {a.save_to}")
    if qwen3 is not None:
        sd = {"model." + k: v.to(save_dtype) for k, v in qwen3.state_dict().items()}
        save_safetensors_atomic(sd, a.save_qwen3_to, {"format": "pt"})
        print(f"wrote {a.save_qwen3_to}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool("anima_merge_lora.py", main))
