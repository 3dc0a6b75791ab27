"""Inspect a LoRA / LoHa / LoKr file: what it holds, which model it is for, and where it loads as it is.

    python networks/inspect_network.py my_lokr.safetensors [--json]

Reports the algorithm and layout of every module (counted by kind), rank / alpha / scale, dtypes and size;
the architecture its names belong to (SDXL U-Net / CLIP-L / bigG, Anima DiT / LLM adapter / Qwen3) and how
many of that part's default targets it covers; unknown or malformed modules; the `ss_*` training settings;
and whether it loads in this project, sd-scripts, ComfyUI, A1111/Forge and diffusers, with the reason for
each "no".
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a script: the project root (not networks/) must be importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from library.tools.file_modules import (  # noqa: E402
    FileError,
    Reference,
    file_kernel,
    layer_shape_from_tensors,
    match_reference,
    module_from_tensors,
    read_network_file,
    real_references,
    to_sd_scripts_names,
)
from library.tools.inspect_loaders import load_verdicts  # noqa: E402
from library.tools.tool_cli import OneLineParser, run_tool  # noqa: E402


def module_kind(m: Any) -> str:
    """A layout label without layer sizes, e.g. `lokr w1 full, w2 tucker, conv 3×3`."""
    conv = f", conv {m.kernel_size[0]}×{m.kernel_size[1]}" if m.is_kxk else ""
    if m.algo == "lokr":
        L = m.lokr_layout
        w1 = "full" if L.w1_rank is None else "low-rank"
        w2 = {"full": "full", "lowrank": "low-rank", "tucker": "tucker"}[L.w2_mode]
        return f"lokr w1 {w1}, w2 {w2}{conv}"
    if m.algo == "loha":
        return ("loha tucker" if m.tucker else "loha") + conv
    return ("lora tucker (lora_mid)" if getattr(m, "tucker", False) else "lora") + conv


def _group(sd: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    bad = []
    for key, t in sd.items():
        name, dot, rest = key.partition(".")
        if not dot or not rest:
            bad.append(f"{key}: not a '<module>.<tensor>' key")
            continue
        groups.setdefault(name, {})[rest] = t
    return groups, bad


def _analyse_module(
    name: str, tensors: dict[str, torch.Tensor], ref: Reference | None
) -> tuple[dict[str, Any] | None, str | None]:
    """(module facts, None) or (None, the problem in one line)."""
    try:
        shape = layer_shape_from_tensors(name, tensors, file_kernel(ref, name, tensors))
        m = module_from_tensors(name, tensors, shape, dtype=None)
    except (KeyError, ValueError) as e:
        return None, str(e.args[0] if e.args else e)
    facts = {
        "name": name,
        "algo": m.algo,
        "kind": module_kind(m),
        "shape": list(shape),
        "rank": m.rank,
        "alpha": m.alpha_value,
        "scale": m.scale,
        "alpha_ignored": m.alpha_is_ignored(),
        "lokr_tucker_conv": m.algo == "lokr" and "lokr_t2" in tensors and m.is_kxk,
        "lora_mid": "lora_mid.weight" in tensors,
    }
    leaf = ref.leaves.get(name) if ref is not None else None
    if leaf is not None and tuple(leaf.weight.shape) != tuple(shape):
        facts["reference_shape"] = list(leaf.weight.shape)
    return facts, None


def _coverage(ref: Reference, names: set[str]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for comp, defaults in ref.defaults.items():
        mine = {n for n in names if ref.component_of(n) == comp}
        if comp == "LLM adapter" and not mine:
            continue  # not a default target of an Anima network: only shown when the file adapts it
        out[comp] = {
            "modules": len(mine),
            "default_targets": len(defaults),
            "covered": len(mine & defaults),
            "outside_defaults": len(mine - defaults),
        }
    return out


def _counts(values: list[Any]) -> dict[str, int]:
    return {str(k): v for k, v in sorted(Counter(values).items(), key=lambda kv: (-kv[1], str(kv[0])))}


def inspect_tensors(
    sd: dict[str, torch.Tensor],
    meta: dict[str, str],
    references: tuple[Reference, ...] | None = None,
) -> dict[str, Any]:
    """The report (a JSON-able dict) for a file's tensors and metadata."""
    refs = real_references() if references is None else references
    dtypes = _counts([str(t.dtype).replace("torch.", "") for t in sd.values()])
    n_params = sum(t.numel() for t in sd.values())
    named, naming, problems = to_sd_scripts_names(sd)
    groups, bad_keys = _group(named)
    problems += bad_keys
    ref, renames = match_reference(set(groups), refs)
    if renames:
        groups = {renames.get(n, n): t for n, t in groups.items()}
    modules, unknown = [], []
    for name in sorted(groups):
        facts, problem = _analyse_module(name, groups[name], ref)
        if problem is not None:
            problems.append(problem)
            continue
        modules.append(facts)
        if ref is not None and name not in ref.leaves:
            unknown.append(name)
    names = {m["name"] for m in modules}
    report: dict[str, Any] = {
        "tensors": len(sd),
        "parameters": n_params,
        "dtypes": dtypes,
        "naming": naming
        + (f"; {len(renames)} model-path names read as their original names" if renames else ""),
        "architecture": ref.arch if ref is not None else None,
        "modules": len(modules),
        "algorithms": _counts([m["algo"] for m in modules]),
        "layouts": _counts([m["kind"] for m in modules]),
        "rank_alpha_scale": _counts(
            [
                f"rank {m['rank']}, alpha {m['alpha']:g}, scale "
                + ("1 (alpha ignored: W1 and W2 full)" if m["alpha_ignored"] else f"{m['scale']:.4g}")
                for m in modules
            ]
        ),
        "coverage": _coverage(ref, names) if ref is not None else {},
        "unknown_modules": unknown,
        "shape_differs_from_released_model": sum(1 for m in modules if "reference_shape" in m),
        "problems": problems,
        "training": {k: v for k, v in sorted(meta.items()) if k.startswith("ss_")},
        "other_metadata": sorted(k for k in meta if not k.startswith("ss_")),
    }
    report["loads"] = load_verdicts(report, modules, named)
    report["module_list"] = modules
    return report


def inspect_file(path: str, references: tuple[Reference, ...] | None = None) -> dict[str, Any]:
    sd, meta = read_network_file(path)
    report = {"file": str(path), "size_bytes": Path(path).stat().st_size}
    report.update(inspect_tensors(sd, meta, references))
    return report


def _short(value: str, limit: int = 160) -> str:
    return value if len(value) <= limit else value[:limit] + f"… ({len(value)} chars)"


def render_text(r: dict[str, Any]) -> str:
    lines = [
        f"file: {r['file']}  ({r['size_bytes']:,} bytes, {r['tensors']} tensors, {r['parameters']:,} values)"
    ]
    lines.append("dtypes: " + ", ".join(f"{k} ×{v}" for k, v in r["dtypes"].items()))
    lines.append(f"naming: {r['naming']}")
    lines.append(f"architecture: {r['architecture'] or 'unknown (no module name matches SDXL or Anima)'}")
    if r["shape_differs_from_released_model"]:
        lines.append(
            f"  {r['shape_differs_from_released_model']} modules have other layer shapes than the released "
            "model (a smaller / other variant)"
        )
    for comp, c in r["coverage"].items():
        extra = f", {c['outside_defaults']} outside them" if c["outside_defaults"] else ""
        lines.append(
            f"  {comp}: {c['modules']} modules, {c['covered']} of {c['default_targets']} default targets{extra}"
        )
    lines.append(f"modules: {r['modules']}  " + ", ".join(f"{k} ×{v}" for k, v in r["algorithms"].items()))
    lines += [f"  {k}: {v}" for k, v in r["layouts"].items()]
    lines.append("rank / alpha / scale:")
    lines += [f"  {k}: {v}" for k, v in r["rank_alpha_scale"].items()]
    if r["unknown_modules"]:
        lines.append(
            f"unknown modules ({len(r['unknown_modules'])}): " + ", ".join(r["unknown_modules"][:10])
        )
    if r["problems"]:
        lines.append(f"problems ({len(r['problems'])}):")
        lines += [f"  {p}" for p in r["problems"][:20]]
    lines.append(
        "training settings (ss_*):" if r["training"] else "training settings: none (no ss_* metadata)"
    )
    lines += [f"  {k} = {_short(v)}" for k, v in r["training"].items()]
    lines.append("loads:")
    for target, v in r["loads"].items():
        how = f" ({v['how']})" if v.get("how") else ""
        lines.append(f"  {target}: {v['loads']}{how}")
        lines += [f"    - {why}" for why in v["reasons"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="inspect_network.py", description=__doc__.split("\n")[0])
    p.add_argument("file", help="a network .safetensors file (LoRA, LoHa, LoKr; sd-scripts or ComfyUI names)")
    p.add_argument("--json", action="store_true", help="print the report as JSON (with the per-module list)")
    a = p.parse_args(argv)
    report = inspect_file(a.file)
    if a.json:
        print(json.dumps(report, indent=1, ensure_ascii=False))
    else:
        print(render_text(report))
    return 0


__all__ = ["FileError", "inspect_file", "inspect_tensors", "main", "render_text"]

if __name__ == "__main__":
    sys.exit(run_tool("inspect_network.py", main))
