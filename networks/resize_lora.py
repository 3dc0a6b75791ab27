"""Resize a LoRA, or turn LoHa / LoKr into a plain LoRA, by truncated SVD of each module's ΔW; several files
can be merged into one LoRA first.

    python networks/resize_lora.py --model my_loha.safetensors --save_to my_lora.safetensors --new_rank 32
    python networks/resize_lora.py --models a.safetensors b.safetensors --ratios 1 0.5 --save_to ab.safetensors \
        --new_rank 64 --dynamic_method sv_fro --dynamic_param 0.98

Per module the written LoRA is the best rank-r approximation of ΔW = Σ ratioᵢ·ΔWᵢ (each with its own α/r);
its relative Frobenius error, printed per module with --verbose and overall at the end, is the share of the
discarded singular values, √(Σ discarded σ²)/‖ΔW‖ (Eckart–Young). The output has α = r per module (scale 1).
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: the project root (not networks/) must be importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from library.tools import file_modules as fm  # noqa: E402
from library.tools.lora_svd import DYNAMIC_METHODS, LoraFactors, truncated_lora  # noqa: E402
from library.tools.tool_cli import OneLineParser, ToolError, parse_ratios, run_tool  # noqa: E402

logger = logging.getLogger(__name__)

SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COMPUTE_DTYPES = {"float": torch.float32, "double": torch.float64}


def resize_deltas(
    deltas: dict[str, torch.Tensor],
    new_rank: int,
    new_conv_rank: int,
    method: str | None = None,
    param: float | None = None,
    device: str = "cpu",
) -> dict[str, LoraFactors]:
    """A plain LoRA per module (k×k convs at `new_conv_rank`), on `device`, factors back on the CPU."""
    out: dict[str, LoraFactors] = {}
    for name, dw in deltas.items():
        kxk = dw.dim() == 4 and tuple(dw.shape[2:]) != (1, 1)
        f = truncated_lora(dw.to(device), new_conv_rank if kxk else new_rank, method, param)
        f.down, f.up = f.down.cpu(), f.up.cpu()
        out[name] = f
    return out


def lora_state_dict(factors: dict[str, LoraFactors], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for name, f in factors.items():
        sd[f"{name}.lora_down.weight"] = f.down.to(dtype).contiguous()
        sd[f"{name}.lora_up.weight"] = f.up.to(dtype).contiguous()
        sd[f"{name}.alpha"] = torch.tensor(float(f.rank), dtype=torch.float32)
    return sd


def overall_rel_error(factors: dict[str, LoraFactors]) -> float:
    total = math.sqrt(sum(f.norm**2 for f in factors.values()))
    return math.sqrt(sum(f.error**2 for f in factors.values())) / total if total > 0 else 0.0


def output_metadata(
    first_meta: dict[str, str],
    files: list[str],
    ratios: list[float],
    new_rank: int,
    conv_rank: int,
    dynamic: str,
) -> dict[str, str]:
    """The first file's ss_* settings with the network fields of the written LoRA."""
    meta = {k: v for k, v in first_meta.items() if k.startswith("ss_") and k != "ss_network_args"}
    sources = ", ".join(f"{Path(f).name}×{r:g}" for f, r in zip(files, ratios))
    meta.update(
        ss_network_module="networks.lora",
        ss_network_dim="Dynamic" if dynamic else str(new_rank),
        ss_network_alpha="Dynamic" if dynamic else str(new_rank),
        ss_training_comment=f"plain LoRA by truncated SVD of {sources}"
        + (f" ({dynamic})" if dynamic else f" (rank {new_rank}, conv rank {conv_rank})"),
    )
    return meta


def _check_args(a) -> None:  # type: ignore[no-untyped-def]
    if (a.model is None) == (a.models is None):
        raise ToolError("give the input with --model FILE or --models FILE [FILE ...] (one of the two)")
    if a.new_rank < 1 or (a.new_conv_rank is not None and a.new_conv_rank < 1):
        raise ToolError(f"--new_rank {a.new_rank} / --new_conv_rank {a.new_conv_rank}: expected ranks >= 1")
    if a.dynamic_method is not None:
        p = a.dynamic_param
        if p is None:
            raise ToolError(f"--dynamic_method {a.dynamic_method}: needs --dynamic_param")
        if a.dynamic_method == "sv_ratio" and not p >= 1:
            raise ToolError(f"--dynamic_param {p}: sv_ratio keeps σ > σ_max/param, expected a ratio >= 1")
        if a.dynamic_method != "sv_ratio" and not 0 < p <= 1:
            raise ToolError(f"--dynamic_param {p}: {a.dynamic_method} expects a share in (0, 1]")
    elif a.dynamic_param is not None:
        raise ToolError("--dynamic_param: only used with --dynamic_method")
    if Path(a.save_to).suffix != ".safetensors":
        raise ToolError(f"--save_to {a.save_to}: expected a .safetensors path")
    if a.device != "cpu" and not torch.cuda.is_available():
        raise ToolError(f"--device {a.device}: no CUDA device is available (use --device cpu)")


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="resize_lora.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="the LoRA / LoHa / LoKr file to resize or convert")
    p.add_argument("--models", nargs="+", help="several files to merge into one LoRA (with --ratios)")
    p.add_argument(
        "--ratios", type=float, nargs="+", help="one multiplier per --models file (default 1.0 each)"
    )
    p.add_argument("--save_to", required=True, help="output .safetensors (a plain LoRA)")
    p.add_argument(
        "--new_rank", type=int, default=4, help="rank (the maximum with --dynamic_method); default 4"
    )
    p.add_argument("--new_conv_rank", type=int, help="rank for k×k conv layers (default: --new_rank)")
    p.add_argument("--dynamic_method", choices=DYNAMIC_METHODS, help="choose each module's rank from its σ")
    p.add_argument(
        "--dynamic_param",
        type=float,
        help="sv_ratio: keep σ > σ_max/param (≥ 1); sv_fro: Frobenius share to keep; sv_cumulative: share of Σσ",
    )
    p.add_argument(
        "--save_precision", choices=tuple(SAVE_DTYPES), help="dtype of the saved factors (default float)"
    )
    p.add_argument(
        "--precision", choices=tuple(COMPUTE_DTYPES), default="float", help="SVD precision (default float)"
    )
    p.add_argument("--device", default="cpu", help="where to run the SVDs, e.g. cuda (default cpu)")
    p.add_argument("--verbose", action="store_true", help="print every module's rank and error")
    return p


def load_deltas(
    files: list[str], ratios: list[float], dtype: torch.dtype, refs: tuple[fm.Reference, ...] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Σ ratioᵢ·ΔWᵢ per module over the files, and the first file's metadata."""
    loaded = [fm.read_network_file(f, "--model") for f in files]
    names = {k.partition(".")[0] for sd, _ in loaded for k in sd}
    ref, _ = fm.match_reference(names, fm.real_references() if refs is None else refs)
    return fm.summed_deltas([sd for sd, _ in loaded], ratios, ref, dtype, files), loaded[0][1]


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    _check_args(a)
    files = [a.model] if a.model is not None else list(a.models)
    ratios = parse_ratios("--ratios", a.ratios, len(files))
    deltas, meta = load_deltas(files, ratios, COMPUTE_DTYPES[a.precision])
    conv_rank = a.new_conv_rank if a.new_conv_rank is not None else a.new_rank
    factors = resize_deltas(deltas, a.new_rank, conv_rank, a.dynamic_method, a.dynamic_param, a.device)
    for name, f in factors.items():
        if a.verbose:
            print(
                f"{name}: rank {f.rank}, relative error {f.rel_error:.3e}, "
                f"Frobenius retained {f.fro_retained:.2%}, σ max/min {f.max_ratio:.3g}"
            )
    dynamic = f"{a.dynamic_method} {a.dynamic_param:g}" if a.dynamic_method else ""
    save_dtype = SAVE_DTYPES[a.save_precision or "float"]
    from networks.network_io import write_weights

    write_weights(
        a.save_to,
        lora_state_dict(factors, save_dtype),
        output_metadata(meta, files, ratios, a.new_rank, conv_rank, dynamic),
    )
    ranks = [f.rank for f in factors.values()]
    print(
        f"wrote {a.save_to}: {len(factors)} LoRA modules, ranks {min(ranks)}-{max(ranks)}, "
        f"overall relative Frobenius error {overall_rel_error(factors):.3e}"
    )
    return 0


__all__ = ["load_deltas", "lora_state_dict", "main", "overall_rel_error", "resize_deltas"]

if __name__ == "__main__":
    sys.exit(run_tool("resize_lora.py", main))
