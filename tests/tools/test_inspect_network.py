"""networks/inspect_network.py on tiny SDXL / Anima files: counts by kind against the networks that wrote
them, architecture and coverage, problems named by key, the `ss_*` settings, the per-consumer verdicts, and
the command line (--help, --json, one error line for a bad file)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen3ForCausalLM

from library.anima.loading import tiny_qwen3_config
from library.anima.model import Anima, tiny_anima_config
from library.tools.tool_cli import run_tool
from networks import loha, lokr, lora
from networks.convert_anima_lora_to_comfy import to_comfy
from networks.inspect_network import inspect_file, inspect_tensors, main, render_text
from tests.helpers.sdxl_network import build_tiny_sdxl, randomize

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sdxl():
    return build_tiny_sdxl()


@pytest.fixture(scope="module")
def anima():
    torch.manual_seed(0)
    return Anima(tiny_anima_config()).eval(), Qwen3ForCausalLM(tiny_qwen3_config(vocab_size=64)).model.eval()


def _sd(net) -> dict[str, torch.Tensor]:
    randomize(net)
    return net.file_state_dict()


def test_lokr_tucker_counts_coverage_and_comfyui_verdict(sdxl) -> None:
    kw = {"conv_dim": 2, "use_tucker": True, "factor": 4}
    kept = lokr.create_network(1.0, 4, 2, None, sdxl.tes, sdxl.unet, keep_tucker_file=True, **kw)
    r = inspect_tensors(_sd(kept), {"ss_network_dim": "4", "ss_network_module": "networks.lokr", "x": "y"})
    tucker = [m for m in kept.all_loras if m.lokr_layout.w2_mode == "tucker"]
    assert (
        r["architecture"] == "sdxl"
        and r["modules"] == len(kept.all_loras)
        and r["algorithms"] == {"lokr": 293}
    )
    assert r["layouts"]["lokr w1 full, w2 tucker, conv 3×3"] == len(tucker) == 38
    assert (
        sum(r["layouts"].values()) == len(kept.all_loras) and not r["problems"] and not r["unknown_modules"]
    )
    unet = r["coverage"]["SDXL U-Net"]
    assert (
        unet["modules"] == len(kept.unet_loras) and unet["outside_defaults"] == len(tucker) + 27
    )  # k×k convs
    assert r["coverage"]["CLIP-L (TE1)"] == {
        "modules": 18,
        "default_targets": 72,
        "covered": 18,
        "outside_defaults": 0,
    }
    assert r["training"] == {"ss_network_dim": "4", "ss_network_module": "networks.lokr"}
    assert r["other_metadata"] == ["x"]
    full = sum(1 for m in kept.all_loras if m.lokr_layout.both_full)
    assert r["rank_alpha_scale"]["rank 4, alpha 4, scale 1 (alpha ignored: W1 and W2 full)"] == full
    loads = r["loads"]
    assert (
        loads["ComfyUI"]["loads"] == "partly"
        and "38 LoKr Tucker conv modules" in loads["ComfyUI"]["reasons"][0]
    )
    assert loads["this project"]["loads"] == "yes" and loads["A1111/Forge"]["loads"] == "yes"
    assert loads["diffusers"]["loads"] == "no" and "lokr" in loads["diffusers"]["reasons"][0]
    assert loads["sd-scripts"]["loads"].startswith("yes, with")
    # the default save writes a full lokr_w2 instead: ComfyUI loads every module
    saved = lokr.create_network(1.0, 4, 2, None, sdxl.tes, sdxl.unet, **kw)
    r2 = inspect_tensors(_sd(saved), {})
    assert r2["loads"]["ComfyUI"]["loads"] == "yes" and "lokr w1 full, w2 full, conv 3×3" in r2["layouts"]
    assert "training settings: none" in render_text({**r2, "file": "f", "size_bytes": 1})


def test_plain_lora_loads_everywhere_and_mixed_loha_does_not_in_diffusers(sdxl) -> None:
    net = lora.create_network(1.0, 4, 1, None, sdxl.tes, sdxl.unet)
    sd = _sd(net)
    r = inspect_tensors(sd, {})
    assert {k: v["loads"] for k, v in r["loads"].items()} == {
        "this project": "yes",
        "sd-scripts": "yes",
        "ComfyUI": "yes",
        "A1111/Forge": "yes",
        "diffusers": "yes",
    }
    assert r["rank_alpha_scale"] == {"rank 4, alpha 1, scale 0.25": len(net.all_loras)}
    assert r["coverage"]["SDXL U-Net"]["covered"] == len(net.unet_loras)
    other = _sd(loha.create_network(1.0, 2, 1, None, None, sdxl.unet))
    mixed = {**sd, **{k: v for k, v in other.items() if "output_blocks" in k}}
    mixed = {k: v for k, v in mixed.items() if not ("output_blocks" in k and "lora_" in k.split(".", 1)[1])}
    r2 = inspect_tensors(mixed, {})
    assert set(r2["algorithms"]) == {"lora", "loha"} and not r2["problems"]
    assert r2["loads"]["diffusers"]["loads"] == "no" and r2["loads"]["sd-scripts"]["loads"].startswith(
        "yes, with"
    )


def test_problems_unknown_names_and_no_architecture(sdxl) -> None:
    sd = _sd(lora.create_network(1.0, 4, 1, None, None, sdxl.unet))
    first, second = sorted({k.split(".")[0] for k in sd})[:2]
    del sd[f"{first}.lora_up.weight"]
    sd["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(4, 8)
    sd["lora_unet_not_a_layer.lora_up.weight"] = torch.zeros(8, 4)
    sd["stray"] = torch.zeros(1)
    sd[f"{second}.dora_scale"] = torch.zeros(1)
    r = inspect_tensors(sd, {})
    assert "stray: not a '<module>.<tensor>' key" in r["problems"]
    assert f"{first}.lora_up.weight: missing (needed for a lora module)" in r["problems"]
    assert any(p.startswith(f"{second}.dora_scale: unsupported LoRA key") for p in r["problems"])
    assert r["unknown_modules"] == ["lora_unet_not_a_layer"]
    assert r["loads"]["this project"]["loads"] == "no"
    none = inspect_tensors(
        {"foo_bar.lora_down.weight": torch.zeros(2, 3), "foo_bar.lora_up.weight": torch.zeros(3, 2)}, {}
    )
    assert none["architecture"] is None and none["loads"]["ComfyUI"]["loads"] == "unknown"


def test_anima_both_namings_and_the_diffusers_requirements(anima) -> None:
    dit, qwen = anima
    net = loha.create_network(1.0, 4, 1, None, [qwen], dit, train_llm_adapter=True)
    sd = _sd(net)
    r = inspect_tensors(sd, {})
    assert r["architecture"] == "anima" and r["algorithms"] == {"loha": len(net.all_loras)}
    cov = r["coverage"]
    assert (
        cov["LLM adapter"]["modules"] > 0 and cov["LLM adapter"]["covered"] == cov["LLM adapter"]["modules"]
    )
    assert cov["Qwen3 text encoder"]["modules"] == len(net.text_encoder_loras)
    assert r["loads"]["A1111/Forge"]["loads"] == "no" and r["loads"]["diffusers"]["loads"] == "no"
    # ComfyUI names (the project's converter) are read back; diffusers still wants LoRA without alpha keys
    plain = _sd(lora.create_network(1.0, 4, 1, None, [qwen], dit))
    rc = inspect_tensors(to_comfy(plain), {})
    assert rc["naming"].startswith("ComfyUI") and rc["modules"] == len({k.split(".")[0] for k in plain})
    d = rc["loads"]["diffusers"]
    assert d["loads"] == "no" and "alpha keys fail" in d["reasons"][0] and "Qwen3" in d["reasons"][1]
    assert (
        rc["loads"]["sd-scripts"]["loads"] == "no" and "--reverse" in rc["loads"]["sd-scripts"]["reasons"][0]
    )
    # LyCORIS' lora_te1_ names for the one Qwen3 encoder: read as lora_te_, flagged for ComfyUI
    lyco = {k.replace("lora_te_", "lora_te1_"): v for k, v in plain.items()}
    rl = inspect_tensors(lyco, {})
    assert not rl["unknown_modules"] and rl["loads"]["ComfyUI"]["loads"] == "partly"


def test_cli_json_help_and_bad_files(tmp_path, sdxl, capsys) -> None:
    path = tmp_path / "n.safetensors"
    net = lora.create_network(1.0, 4, 1, None, None, sdxl.unet)
    randomize(net)
    net.save_weights(str(path), torch.bfloat16, {"ss_network_alpha": "1"})
    assert main([str(path), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["dtypes"] == {"bfloat16": len(net.all_loras) * 2, "float32": len(net.all_loras)}
    assert r["size_bytes"] == path.stat().st_size and r["training"] == {"ss_network_alpha": "1"}
    assert len(r["module_list"]) == len(net.all_loras)
    assert inspect_file(str(path))["modules"] == len(net.all_loras)
    assert run_tool("inspect_network.py", main, [str(tmp_path / "missing.safetensors")]) == 2
    assert capsys.readouterr().err.strip().endswith("does not exist (expected a .safetensors file)")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    out = subprocess.run(
        [sys.executable, str(ROOT / "networks" / "inspect_network.py"), str(junk)],
        capture_output=True,
        text=True,
    )
    err = [line for line in out.stderr.splitlines() if "inspect_network.py" in line]
    assert out.returncode == 2 and "Traceback" not in out.stderr
    # the shared tensor-file reader says what the file is instead (networks/tensor_files.py)
    assert len(err) == 1 and "junk.safetensors" in err[0] and "not a tensor file" in err[0]
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--json" in capsys.readouterr().out
