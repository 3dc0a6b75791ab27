"""Where a network file loads as it is: this project, sd-scripts, ComfyUI, A1111/Forge and diffusers.

Each verdict is `yes`, `partly` (some modules are skipped or left unchanged), `no` or `unknown`, with one
reason per obstacle and what to run instead. The rules are facts of each consumer's loader:

- ComfyUI reads LoRA (incl. `lora_mid`), LoHa (incl. Tucker) and every LoKr layout, but builds a `lokr_t2`
  conv core's W2 as a non-contiguous tensor that its Kronecker product rejects: it logs an error and leaves
  that layer unchanged. It maps Anima's `lora_unet_` / `lora_te_` and `diffusion_model.` names, not LyCORIS'
  `lora_te1_` for the Qwen3 encoder.
- sd-scripts' `networks.lora` (SDXL) and `networks.lora_anima` read `lora_down` / `lora_up` / `alpha` only.
- A1111's built-in Lora extension (and Forge) reads LoRA, LoHa and LoKr for SDXL; neither has Anima.
- diffusers' SDXL pipeline converts kohya LoRA keys and stops at any other key; its Anima loader converts
  `diffusion_model.` (ComfyUI) names, needs every key to contain "lora" (so no `alpha`) and loads the DiT and
  the LLM adapter, not Qwen3.
"""

from __future__ import annotations

from typing import Any

import torch

RESIZE = "networks/resize_lora.py (to a plain LoRA)"
CONVERT = "networks/convert_anima_lora_to_comfy.py"


def _verdict(reasons: list[str], partial: list[str], how: str = "") -> dict[str, Any]:
    if reasons:
        return {"loads": "no", "reasons": reasons + partial, "how": ""}
    if partial:
        return {"loads": "partly", "reasons": partial, "how": how}
    return {"loads": "yes", "reasons": [], "how": how}


def _this_project(r: dict[str, Any]) -> dict[str, Any]:
    if r["architecture"] is None:
        return _verdict(["no module name matches an SDXL or Anima layer"], [])
    reasons = []
    if r["problems"]:
        reasons.append(f"{len(r['problems'])} malformed or unsupported entries, e.g. {r['problems'][0]}")
    if r["unknown_modules"]:
        reasons.append(
            f"{len(r['unknown_modules'])} module names match no layer, e.g. {r['unknown_modules'][0]}"
        )
    if r["architecture"] == "sdxl":
        algos = sorted(r["algorithms"]) or ["lora"]
        how = f"gen_img.py --network_module networks.{algos[0]} --network_weights FILE"
    else:
        how = "anima_minimal_inference.py --lora_weight FILE"
        if r["naming"].startswith("ComfyUI"):
            how += "; for training --network_weights convert back with " + CONVERT + " --reverse"
    return _verdict(reasons, [], how)


def _sd_scripts(r: dict[str, Any], modules: list[dict[str, Any]]) -> dict[str, Any]:
    if r["architecture"] is None:
        return _verdict(["no module name matches an SDXL or Anima layer"], [])
    base = "networks.lora" if r["architecture"] == "sdxl" else "networks.lora_anima"
    reasons = []
    if r["naming"].startswith("ComfyUI"):
        reasons.append(f"sd-scripts reads lora_unet_/lora_te_ names: convert with {CONVERT} --reverse")
    if r["problems"]:
        reasons.append(f"{len(r['problems'])} malformed or unsupported entries")
    algos = set(r["algorithms"])
    mid = sum(1 for m in modules if m["lora_mid"])
    if algos - {"lora"} or mid:
        what = ", ".join(sorted(algos - {"lora"}) + (["lora_mid (LoCon Tucker)"] if mid else []))
        how = "--network_module networks.loha / networks.lokr of this project (drop-in), or lycoris.kohya"
        note = f"{base} reads lora_down/lora_up only; this file has {what}"
        v = _verdict(reasons, [], how)
        if v["loads"] == "yes":
            v["loads"] = "yes, with a LoHa/LoKr network module"
        v["reasons"].insert(0, note)
        return v
    return _verdict(reasons, [], f"--network_module {base}")


def _comfyui(r: dict[str, Any], modules: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    if r["architecture"] is None:
        return {"loads": "unknown", "reasons": ["no module name matches an SDXL or Anima layer"], "how": ""}
    partial = []
    tucker = sum(1 for m in modules if m["lokr_tucker_conv"])
    if tucker:
        partial.append(
            f"{tucker} LoKr Tucker conv modules (lokr_t2): ComfyUI's Kronecker product fails on them and leaves "
            f"those layers unchanged; convert with {RESIZE}, or save with this project (a full lokr_w2)"
        )
    te1 = sum(1 for n in names if n.startswith("lora_te1_"))
    if r["architecture"] == "anima" and te1:
        partial.append(
            f"{te1} Qwen3 tensors use LyCORIS' lora_te1_ names, which ComfyUI does not map: {CONVERT}"
        )
    return _verdict([], partial, "LoraLoader / LoraLoaderModelOnly")


def _a1111(r: dict[str, Any]) -> dict[str, Any]:
    if r["architecture"] == "anima":
        return _verdict(
            ["A1111 has no Anima (Cosmos DiT) model; Forge forks that add one are not checked here"], []
        )
    if r["architecture"] is None:
        return {"loads": "unknown", "reasons": ["no module name matches an SDXL or Anima layer"], "how": ""}
    if "model-path" in r["naming"]:
        return {
            "loads": "unknown",
            "reasons": ["diffusers module-path names are not checked for A1111"],
            "how": "",
        }
    return _verdict([], [], "built-in Lora extension (<lora:name:1>)")


def _diffusers(r: dict[str, Any], modules: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    algos = set(r["algorithms"])
    mid = sum(1 for m in modules if m["lora_mid"])
    reasons = []
    if algos - {"lora"} or mid:
        what = ", ".join(sorted(algos - {"lora"}) + (["lora_mid"] if mid else []))
        reasons.append(f"diffusers converts plain LoRA keys only and stops at {what}: {RESIZE}")
    if r["architecture"] == "sdxl":
        return _verdict(reasons, [], "StableDiffusionXLPipeline.load_lora_weights")
    if r["architecture"] is None:
        return _verdict(reasons + ["no module name matches an SDXL or Anima layer"], [])
    if not r["naming"].startswith("ComfyUI"):
        reasons.append(f"diffusers' Anima loader reads diffusion_model.… names: {CONVERT} --bake_alpha")
    elif any(n.endswith(".alpha") for n in names):
        reasons.append(
            f"diffusers' Anima loader needs every key to contain 'lora' (alpha keys fail): {CONVERT} --bake_alpha"
        )
    partial = []
    qwen = sum(1 for m in modules if m["name"].startswith(("lora_te_", "lora_te1_")))
    if qwen:
        partial.append(
            f"{qwen} Qwen3 text-encoder modules are not loaded (the Anima pipeline adapts the DiT and LLM adapter)"
        )
    return _verdict(reasons, partial, "AnimaPipeline.load_lora_weights")


def load_verdicts(
    report: dict[str, Any], modules: list[dict[str, Any]], sd: dict[str, torch.Tensor]
) -> dict[str, dict[str, Any]]:
    """Verdicts for each consumer from the report's facts, the module facts and the (sd-scripts-named) keys."""
    names = list(sd)
    return {
        "this project": _this_project(report),
        "sd-scripts": _sd_scripts(report, modules),
        "ComfyUI": _comfyui(report, modules, names),
        "A1111/Forge": _a1111(report),
        "diffusers": _diffusers(report, modules, names),
    }
