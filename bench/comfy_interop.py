"""Do the files this project writes load in ComfyUI? Runs ComfyUI's own LoRA loader on them and compares ΔW.

On a tiny random SDXL (same module tree and key layout as the released model) this builds LoRA, LoHa and
LoKr networks, a LoKr with `use_tucker=True` on the k×k convs (saved with the default full `lokr_w2`, and
once more with `keep_tucker_file=True`), a `networks/resize_lora.py` output and a
`networks/sdxl_merge_lora.py` checkpoint, and hands each file to ComfyUI's code, taken from a checkout:

- the model keys ComfyUI patches: `comfy.model_detection.detect_unet_config` on our SGM checkpoint, U-Net
  keys as ComfyUI's model holds them (`diffusion_model.*`), CLIP keys from ComfyUI's SDXL
  `process_clip_state_dict` (`clip_l.*`, `clip_g.*`);
- the steps of `comfy.sd.load_lora_for_models`: `comfy.lora.model_lora_keys_unet` / `model_lora_keys_clip`,
  `comfy.lora_convert.convert_lora`, `comfy.lora.load_lora` (its "lora key not loaded" warnings are the
  unconsumed keys) on `comfy.utils.load_torch_file`'s tensors;
- each patch applied by `comfy.lora.calculate_weight` at strength 1 (fp32, as ComfyUI does), to a zero
  weight for ΔW and to the base weight for the merged-checkpoint check.

ΔW is compared with the saved network's own ΔW in fp64 (for the resized file: with what our loader builds
from it); the error is max|ΔW_comfy − ΔW_ours| / max|ΔW_ours| over each module, worst module reported.

    python3 bench/comfy_interop.py --comfy_path baselines/ComfyUI [--json out.json]

ComfyUI is imported by path from the checkout. Third-party packages it imports at module level that are
absent here are replaced by empty modules, and only those: `comfy_aimdo` (ComfyUI's memory offloader, only
called when a model is loaded onto a device) and, when `comfy.model_base` cannot be imported (it pulls in
torchvision), an empty `comfy.model_base` whose classes match no model — the SDXL branch of
`model_lora_keys_unet` uses none of them. The run prints which stand-ins were used.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import sys
import tempfile
import types
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.sdxl.config import tiny_sdxl_configs  # noqa: E402
from library.sdxl.loading import SdxlModels, build_sdxl_from_configs, save_sdxl_single_file  # noqa: E402
from library.tools.tool_cli import OneLineParser, ToolError, run_tool  # noqa: E402
from networks import loha, lokr, lora  # noqa: E402

PROG = "comfy_interop.py"
UNET_PREFIX = "model.diffusion_model."
AIMDO_MODULES = ("", ".host_buffer", ".vram_buffer", ".model_mmap", ".torch", ".model_vbar")
# ComfyUI patches in fp32: a few hundred fp32 roundings of ΔW (rank sums, Kronecker products) stay far below
TOLERANCE = 1e-5


# ------------------------------------------------------------------------------------ importing ComfyUI


class _NoModelClasses(types.ModuleType):
    """Stands in for `comfy.model_base`: every class name is a fresh class that no model is an instance of."""

    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        cls = type(name, (), {})
        setattr(self, name, cls)
        return cls


@dataclass
class Comfy:
    lora: Any
    lora_convert: Any
    utils: Any
    model_detection: Any
    supported_models: Any
    stand_ins: list[str]


def import_comfy(path: Path) -> Comfy:
    if not (path / "comfy" / "lora.py").is_file() or not (path / "comfy" / "weight_adapter").is_dir():
        raise ToolError(
            f"--comfy_path {path}: no comfy/lora.py and comfy/weight_adapter/ (expected a ComfyUI checkout)"
        )
    sys.path.insert(0, str(path.resolve()))
    stand_ins = []
    if importlib.util.find_spec("comfy_aimdo") is None:
        for suffix in AIMDO_MODULES:
            module = types.ModuleType("comfy_aimdo" + suffix)
            module.__path__ = []
            sys.modules[module.__name__] = module
        stand_ins.append("comfy_aimdo (not installed): empty modules")
    options = importlib.import_module("comfy.options")
    options.enable_args_parsing()
    argv, sys.argv = sys.argv, [sys.argv[0], "--cpu"]  # ComfyUI reads its flags when cli_args is imported
    try:
        importlib.import_module("comfy.cli_args")
    finally:
        sys.argv = argv
    try:
        importlib.import_module("comfy.model_base")
    except ImportError as e:
        stand_in = _NoModelClasses("comfy.model_base")
        sys.modules[stand_in.__name__] = stand_in
        sys.modules["comfy"].model_base = stand_in  # `comfy.model_base.X` is looked up on the package
        stand_ins.append(f"comfy.model_base (import failed: {e}): classes that match no model")
    names = ("lora", "lora_convert", "utils", "model_detection", "supported_models")
    mods = {n: importlib.import_module(f"comfy.{n}") for n in names}
    return Comfy(**mods, stand_ins=stand_ins)


# ------------------------------------------------------------------------- what ComfyUI sees of a model


@dataclass
class _ModelKeys:
    """The two things ComfyUI's key mapping reads from its model / CLIP object: state-dict keys, config."""

    tensors: dict[str, torch.Tensor]
    model_config: Any = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.tensors


@dataclass
class ComfyModel:
    unet: _ModelKeys
    clip: _ModelKeys
    unet_config: dict[str, Any]

    def weight(self, key: str) -> torch.Tensor:
        return self.unet.tensors[key] if key in self.unet.tensors else self.clip.tensors[key]


def comfy_model(comfy: Comfy, checkpoint: Path) -> ComfyModel:
    sd = comfy.utils.load_torch_file(str(checkpoint), safe_load=True)
    unet_config = comfy.model_detection.detect_unet_config(sd, UNET_PREFIX)
    model_config = comfy.supported_models.SDXL(unet_config)
    unet = {"diffusion_model." + k[len(UNET_PREFIX) :]: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    clip = model_config.process_clip_state_dict(dict(sd))
    clip = {k: v for k, v in clip.items() if k.startswith(("clip_l.", "clip_g."))}
    return ComfyModel(_ModelKeys(unet, model_config), _ModelKeys(clip), unet_config)


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def captured() -> Iterator[_Messages]:
    """ComfyUI reports unloaded keys and failed patches on the root logger; collect them."""
    h = _Messages()
    root = logging.getLogger()
    root.addHandler(h)
    try:
        yield h
    finally:
        root.removeHandler(h)


@dataclass
class ComfyLoad:
    key_map: dict[str, Any]
    patches: dict[str, Any]
    not_loaded: list[str]
    file_keys: list[str]


def comfy_load(comfy: Comfy, model: ComfyModel, file: Path) -> ComfyLoad:
    """The key-mapping and adapter-loading steps of ComfyUI's `load_lora_for_models`, in its order."""
    key_map: dict[str, Any] = {}
    comfy.lora.model_lora_keys_unet(model.unet, key_map)
    comfy.lora.model_lora_keys_clip(model.clip, key_map)
    sd = comfy.lora_convert.convert_lora(comfy.utils.load_torch_file(str(file), safe_load=True))
    with captured() as log:
        patches = comfy.lora.load_lora(sd, key_map)
    prefix = "lora key not loaded: "
    not_loaded = [r.getMessage()[len(prefix) :] for r in log.records if r.getMessage().startswith(prefix)]
    return ComfyLoad(key_map, patches, not_loaded, sorted(sd))


def comfy_patch(comfy: Comfy, adapter: Any, key: str, weight: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """`weight` patched by one adapter at strength 1 with ComfyUI's calculate_weight; its ERROR lines."""
    with captured() as log:
        out = comfy.lora.calculate_weight([(1.0, adapter, 1.0, None, None)], weight, key)
    return out, [r.getMessage() for r in log.records if r.levelno >= logging.ERROR]


# --------------------------------------------------------------------------------------- the comparison


@dataclass
class CaseResult:
    case: str
    modules: int
    file_keys: int
    not_loaded: int
    patched: int
    unmatched_modules: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)
    max_rel_err: float = 0.0
    worst: str = ""
    failed_layers: list[str] = field(default_factory=list)  # ΔW left at 0 by ComfyUI where ours is not
    t2_modules: list[str] = field(default_factory=list)  # modules whose file tensors include a lokr_t2 core

    @property
    def clean(self) -> bool:
        bad = (
            self.not_loaded
            or self.unmatched_modules
            or self.errors
            or self.shape_mismatch
            or self.failed_layers
        )
        return not bad and (self.patched == self.modules and self.max_rel_err <= TOLERANCE)


def compare(
    comfy: Comfy, model: ComfyModel, case: str, file: Path, ours: dict[str, torch.Tensor]
) -> CaseResult:
    loaded = comfy_load(comfy, model, file)
    r = CaseResult(case, len(ours), len(loaded.file_keys), len(loaded.not_loaded), 0)
    r.t2_modules = [k[: -len(".lokr_t2")] for k in loaded.file_keys if k.endswith(".lokr_t2")]
    for name, want in ours.items():
        key = loaded.key_map.get(name)
        if key is None or key not in loaded.patches:
            r.unmatched_modules.append(name)
            continue
        r.patched += 1
        base = model.weight(key)
        if tuple(base.shape) != tuple(want.shape):
            r.shape_mismatch.append(f"{name}: ComfyUI {tuple(base.shape)} ours {tuple(want.shape)}")
            continue
        got, errors = comfy_patch(comfy, loaded.patches[key], key, torch.zeros(base.shape))
        r.errors += errors
        if not got.any():  # ComfyUI logged the error and left the layer as it was
            r.failed_layers.append(name)
            continue
        err = float((got.double() - want).abs().max() / want.abs().max())
        if err > r.max_rel_err or not r.worst:
            r.max_rel_err, r.worst = err, name
    return r


def compare_merged(
    comfy: Comfy,
    base: ComfyModel,
    merged: ComfyModel,
    files: list[tuple[Path, float, dict[str, torch.Tensor]]],
) -> CaseResult:
    """ComfyUI applying each (file, strength) in turn to the base checkpoint, as chained LoRA loaders do,
    vs. our merged checkpoint, which ComfyUI reads too (same detected U-Net config and CLIP keys)."""
    loads = [comfy_load(comfy, base, f) for f, _, _ in files]
    names = sorted({n for _, _, ours in files for n in ours})
    file_keys = sum(len(x.file_keys) for x in loads)
    r = CaseResult(
        "sdxl_merge_lora.py checkpoint", len(names), file_keys, sum(len(x.not_loaded) for x in loads), 0
    )
    if merged.unet_config != base.unet_config or set(merged.clip.tensors) != set(base.clip.tensors):
        r.errors.append("ComfyUI reads the merged checkpoint as a different model than the base")
    for name in names:
        keys = {x.key_map.get(name) for x in loads}
        patches = [
            (ratio, x.patches[k], 1.0, None, None)
            for x, (_, ratio, _) in zip(loads, files)
            for k in keys
            if k in x.patches
        ]
        if len(keys) != 1 or len(patches) != len(files):
            r.unmatched_modules.append(name)
            continue
        key = keys.pop()
        r.patched += 1
        want = sum(ratio * ours[name] for _, ratio, ours in files)
        with captured() as log:
            patched = comfy.lora.calculate_weight(patches, base.weight(key).float().clone(), key)
        r.errors += [m.getMessage() for m in log.records if m.levelno >= logging.ERROR]
        err = float((merged.weight(key).double() - patched.double()).abs().max() / want.abs().max())
        if err > r.max_rel_err or not r.worst:
            r.max_rel_err, r.worst = err, name
    return r


# ------------------------------------------------------------------------------- the files we write


def tiny_sdxl(seed: int = 0) -> SdxlModels:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        models = build_sdxl_from_configs(tiny_sdxl_configs(), (None, None))
    for m in (models.unet, models.vae, models.text_encoder_1, models.text_encoder_2):
        m.eval().requires_grad_(False)
    return models


def randomized(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-zero factors (a fresh network has ΔW = 0, which would compare equal to anything)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.2)
    return net


NETWORKS: dict[str, tuple[Any, dict[str, Any]]] = {
    "LoRA (LoCon 3×3)": (lora, {"conv_dim": 2, "conv_alpha": 1}),
    "LoHa (Tucker 3×3)": (loha, {"conv_dim": 2, "conv_alpha": 1, "use_tucker": True}),
    "LoKr (factor 4, 3×3)": (lokr, {"conv_dim": 2, "conv_alpha": 1, "factor": 4}),
    "LoKr use_tucker (full W2 saved)": (
        lokr,
        {"conv_dim": 2, "conv_alpha": 3, "factor": 4, "use_tucker": True},
    ),
    "LoKr use_tucker keep_tucker_file": (
        lokr,
        {"conv_dim": 2, "conv_alpha": 3, "factor": 4, "use_tucker": True, "keep_tucker_file": "True"},
    ),
}
KNOWN_FAILURE = "LoKr use_tucker keep_tucker_file"
TUCKER_FULL = "LoKr use_tucker (full W2 saved)"
# merged into one checkpoint together (mixed algorithms, a negative ratio): ComfyUI chains the same files
MERGE_MIX = {"LoRA (LoCon 3×3)": 0.8, "LoHa (Tucker 3×3)": -0.5, TUCKER_FULL: 1.0}


def save_network(models: SdxlModels, module: Any, kwargs: dict[str, Any], path: Path, seed: int) -> dict:
    """Save a randomized network; return its ΔW per module name in fp64."""
    net = module.create_network(1.0, 4, 2, None, models.text_encoders, models.unet, **kwargs)
    randomized(net, seed).save_weights(str(path), None, {})
    net.double()
    return {m.lora_name: m.delta_weight(1.0).detach() for m in net.all_loras}


def file_deltas(models: SdxlModels, path: Path) -> dict[str, torch.Tensor]:
    """ΔW of a LoRA file as our loader builds it (the reference for files made by our tools)."""
    net, _ = lora.create_network_from_weights(1.0, str(path), None, models.text_encoders, models.unet)
    net.load_weights(str(path))
    net.double()
    return {m.lora_name: m.delta_weight(1.0).detach() for m in net.all_loras}


def run_cases(comfy: Comfy, work: Path) -> list[CaseResult]:
    from networks import resize_lora, sdxl_merge_lora

    models = tiny_sdxl()
    base_file = work / "base.safetensors"
    save_sdxl_single_file(models, base_file, torch.float32)
    base = comfy_model(comfy, base_file)
    results, ours = [], {}
    for i, (case, (module, kwargs)) in enumerate(NETWORKS.items()):
        path = work / f"net{i}.safetensors"
        ours[case] = (path, save_network(models, module, kwargs, path, seed=10 + i))
        results.append(compare(comfy, base, case, path, ours[case][1]))

    src = ours[TUCKER_FULL][0]
    resized = work / "resized.safetensors"
    argv = ["--model", str(src), "--save_to", str(resized), "--new_rank", "3", "--new_conv_rank", "2"]
    if resize_lora.main(argv) != 0:
        raise RuntimeError("resize_lora.py failed on our own LoKr file")
    results.append(compare(comfy, base, "resize_lora.py LoKr → LoRA", resized, file_deltas(models, resized)))

    merged_file = work / "merged.safetensors"
    mix = [(*ours[case], ratio) for case, ratio in MERGE_MIX.items()]
    argv = [
        "--sd_model",
        str(base_file),
        "--save_to",
        str(merged_file),
        "--models",
        *(str(f) for f, _, _ in mix),
    ]
    argv += ["--ratios", *(str(x) for _, _, x in mix), "--precision", "float", "--save_precision", "float"]
    if sdxl_merge_lora.main(argv) != 0:
        raise RuntimeError("sdxl_merge_lora.py failed on our own checkpoint")
    files = [(f, ratio, deltas) for f, deltas, ratio in mix]
    results.append(compare_merged(comfy, base, comfy_model(comfy, merged_file), files))
    return results


# ----------------------------------------------------------------------------------------------- report


def verdict(r: CaseResult) -> str:
    if r.case != KNOWN_FAILURE:
        return "loads, ΔW equal" if r.clean else "FAILS"
    # the known ComfyUI failure: exactly the modules saved with a lokr_t2 core log an error and stay unchanged
    same = sorted(r.failed_layers) == sorted(r.t2_modules) and len(r.errors) == len(r.t2_modules) > 0
    return "known failure reproduced" if same and not r.clean else "known failure NOT reproduced"


def table(results: list[CaseResult]) -> str:
    cols = (
        "modules | file keys | keys not loaded | patched | lokr_t2 modules | errors logged | layers unchanged"
    )
    lines = [f"| case | {cols} | max rel ΔW err (patched layers) | verdict |", "|" + "---|" * 10]
    for r in results:
        lines.append(
            f"| {r.case} | {r.modules} | {r.file_keys} | {r.not_loaded} | {r.patched} | {len(r.t2_modules)} | "
            f"{len(r.errors)} | {len(r.failed_layers)} | {r.max_rel_err:.1e} | {verdict(r)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--comfy_path", required=True, type=Path, help="a ComfyUI checkout (its comfy/ folder is read)"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here as JSON")
    a = p.parse_args(argv)
    comfy = import_comfy(a.comfy_path)
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest and the numbers do not depend on it
    with tempfile.TemporaryDirectory() as work:
        results = run_cases(comfy, Path(work))
    print("ComfyUI stand-ins: " + ("; ".join(comfy.stand_ins) or "none"))
    print(table(results))
    for r in results:
        for line in r.errors[:1] + r.unmatched_modules[:3] + r.shape_mismatch[:3]:
            print(f"  {r.case}: {line}")
    if a.json is not None:
        rows = [asdict(r) | {"verdict": verdict(r)} for r in results]
        a.json.write_text(
            json.dumps({"stand_ins": comfy.stand_ins, "tolerance": TOLERANCE, "cases": rows}, indent=1)
        )
    ok = all(verdict(r) in ("loads, ΔW equal", "known failure reproduced") for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run_tool(PROG, main))
