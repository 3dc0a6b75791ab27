"""networks/sdxl_merge_lora.py and networks/anima_merge_lora.py on tiny models: a mixed LoRA + LoHa + LoKr
merge gives the unmerged networks' output at the given ratios (fp32), the file loads in our loader and in
diffusers' single-file loader (offline, with the model's own config), and every bad input is one error line."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3ForCausalLM

from library.anima.loading import load_anima_dit, load_qwen3_text_encoder, save_anima_dit, tiny_qwen3_config
from library.anima.model import Anima, tiny_anima_config
from library.io.atomic_io import save_safetensors_atomic
from library.sdxl.config import tiny_sdxl_configs
from library.sdxl.loading import build_sdxl_from_configs, load_sdxl_single_file, save_sdxl_single_file
from library.tools.tool_cli import run_tool
from networks import anima_merge_lora, loha, lokr, lora, sdxl_merge_lora
from networks.convert_anima_lora_to_comfy import to_comfy
from tests.helpers.sdxl_network import randomize, run_unet, unet_inputs

IDS = torch.tensor([[49406, 320, 1125, 539, 49407, 0, 0]])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def sdxl_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ck") / "tiny_sdxl.safetensors"
    save_sdxl_single_file(build_sdxl_from_configs(tiny_sdxl_configs(), (None, None)), path)
    return path


def _sdxl_networks(tmp_path, parts) -> list:
    tes, unet = [parts["text_encoder_1"], parts["text_encoder_2"]], parts["unet"]
    nets = [
        lora.create_network(1.0, 4, 2, None, tes, unet),
        loha.create_network(1.0, 2, 1, None, None, unet, conv_dim=2, use_tucker=True),
        lokr.create_network(
            1.0, 4, 2, None, None, unet, factor=4, conv_dim=2, use_tucker=True, keep_tucker_file=True
        ),
    ]
    paths = []
    for i, net in enumerate(nets):
        randomize(net, seed=10 + i, std=0.1)
        paths.append(tmp_path / f"n{i}.safetensors")
        net.save_weights(str(paths[-1]), torch.bfloat16 if i == 2 else None, {})
    return nets, paths


def test_sdxl_merge_equals_the_unmerged_networks(tmp_path, sdxl_ckpt, capsys) -> None:
    parts = load_sdxl_single_file(sdxl_ckpt)
    nets, paths = _sdxl_networks(tmp_path, parts)
    ratios = [1.0, 0.5, -0.7]
    live = []
    tes = [parts["text_encoder_1"], parts["text_encoder_2"]]
    for path, r in zip(paths, ratios):  # the saved files (bf16 for the LoKr) applied as modules
        net, sd = lora.create_network_from_weights(r, str(path), None, tes, parts["unet"], for_inference=True)
        net.apply_to(tes, parts["unet"])
        net.load_weights(str(path))
        live.append(net)
    inputs = unet_inputs()
    with torch.no_grad():
        want_unet = run_unet(parts["unet"], inputs)
        want_tes = [te(IDS).last_hidden_state for te in tes]
    out = tmp_path / "merged.safetensors"
    argv = ["--sd_model", str(sdxl_ckpt), "--save_to", str(out), "--models", *map(str, paths)]
    assert sdxl_merge_lora.main(argv + ["--ratios", *map(str, ratios)]) == 0
    log = capsys.readouterr().out
    n = [len(net.all_loras) for net in nets]
    assert f"merged {n[0]} modules ({n[0]} lora)" in log and f"merged {n[2]} modules ({n[2]} lokr)" in log
    merged = load_sdxl_single_file(out)
    base = load_sdxl_single_file(sdxl_ckpt)
    with torch.no_grad():
        got_unet, base_unet = run_unet(merged["unet"], inputs), run_unet(base["unet"], inputs)
        assert _rel(got_unet, want_unet) < 2e-6 and _rel(base_unet, want_unet) > 1e-3
        for k, want in zip(("text_encoder_1", "text_encoder_2"), want_tes):
            assert _rel(merged[k](IDS).last_hidden_state, want) < 2e-6
    # diffusers' own single-file loader reads the U-Net (offline: the config comes from the model)
    from diffusers import UNet2DConditionModel

    cfg = tmp_path / "unet_config"
    merged["unet"].save_config(str(cfg))
    theirs = UNet2DConditionModel.from_single_file(str(out), config=str(cfg), local_files_only=True)
    ours = merged["unet"].state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in theirs.state_dict().items()) and len(ours) == len(
        theirs.state_dict()
    )


def test_sdxl_merge_save_precision(tmp_path, sdxl_ckpt) -> None:
    parts = load_sdxl_single_file(sdxl_ckpt)
    _, paths = _sdxl_networks(tmp_path, parts)
    out = tmp_path / "m16.safetensors"
    argv = [
        "--sd_model",
        str(sdxl_ckpt),
        "--save_to",
        str(out),
        "--models",
        str(paths[0]),
        "--save_precision",
        "fp16",
    ]
    assert sdxl_merge_lora.main(argv) == 0
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16


@pytest.fixture(scope="module")
def anima_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("anima")
    torch.manual_seed(0)
    dit, qwen = (
        Anima(tiny_anima_config()).eval(),
        Qwen3ForCausalLM(tiny_qwen3_config(vocab_size=64)).model.eval(),
    )
    save_anima_dit(dit, d / "dit.safetensors")
    save_safetensors_atomic({"model." + k: v for k, v in qwen.state_dict().items()}, d / "qwen3.safetensors")
    return d / "dit.safetensors", d / "qwen3.safetensors"


def test_anima_merge_dit_and_qwen3_mixed_and_comfy_names(tmp_path, anima_files) -> None:
    dit_path, qwen_path = anima_files
    dit, qwen = load_anima_dit(dit_path, torch.float32), load_qwen3_text_encoder(qwen_path, torch.float32)
    a = lokr.create_network(1.0, 4, 2, None, [qwen], dit, factor=4, train_llm_adapter=True)
    b = loha.create_network(1.0, 2, 1, None, None, dit)
    paths = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for i, (net, p) in enumerate(zip((a, b), paths)):
        randomize(net, seed=20 + i, std=0.1)
        net.save_weights(str(p), None, {})
    comfy = tmp_path / "b_comfy.safetensors"  # b in ComfyUI names
    save_safetensors_atomic(to_comfy(b.file_state_dict()), comfy)
    ratios = (0.8, -0.4)
    want = {n: p.detach().clone() for n, p in list(dit.named_parameters()) + list(qwen.named_parameters())}
    for net, r in zip((a, b), ratios):
        for m in net.all_loras:
            key = next(n for n, p in list(dit.named_parameters()) + [("te." + n, p) for n, p in qwen.named_parameters()]
                       if p is m.org_module.weight)  # fmt: skip
            want[key.removeprefix("te.")] = want[key.removeprefix("te.")] + m.delta_weight(r).detach()
    out, out_te = tmp_path / "dit_m.safetensors", tmp_path / "qwen_m.safetensors"
    argv = ["--dit", str(dit_path), "--save_to", str(out), "--models", str(paths[0]), str(comfy), "--ratios", "0.8",
            "-0.4", "--qwen3", str(qwen_path), "--save_qwen3_to", str(out_te)]  # fmt: skip
    assert anima_merge_lora.main(argv) == 0
    got = dict(load_anima_dit(out, torch.float32).named_parameters())
    got.update(load_qwen3_text_encoder(out_te, torch.float32).named_parameters())
    changed = 0
    for n, w in want.items():
        assert torch.allclose(got[n], w, rtol=0, atol=1e-6 * max(1.0, float(w.abs().max()))), n
        changed += not torch.equal(
            w, dict(dit.named_parameters()).get(n, dict(qwen.named_parameters()).get(n))
        )
    assert changed == len({id(m.org_module) for m in a.all_loras + b.all_loras})
    # without --qwen3, text-encoder modules are an error unless --skip_text_encoder
    out2 = tmp_path / "dit_only.safetensors"
    base = ["--dit", str(dit_path), "--save_to", str(out2), "--models", str(paths[0])]
    assert run_tool("anima_merge_lora.py", anima_merge_lora.main, base) == 2
    assert anima_merge_lora.main(base + ["--skip_text_encoder"]) == 0
    dit_only = dict(load_anima_dit(out2, torch.float32).named_parameters())
    qname = next(n for n, p in dit.named_parameters() if p is a.unet_loras[0].org_module.weight)
    assert torch.allclose(
        dit_only[qname],
        dict(dit.named_parameters())[qname] + a.unet_loras[0].delta_weight(1.0).detach(),
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "overrides,extra,message",
    [
        ({}, ["--ratios", "1", "2"], "--ratios: 2 value(s) given for 1 file(s)"),
        ({}, ["--precision", "fp8"], "invalid choice: 'fp8'"),
        ({"--save_to": "SAME"}, [], "the same file as --sd_model"),
        ({"--save_to": "o.ckpt"}, [], "expected a .safetensors path"),
        ({"--models": "MISSING"}, [], "--models MISSING: does not exist"),
        ({"--sd_model": "MISSING"}, [], "--sd_model MISSING: does not exist"),
        ({"--models": "FOREIGN"}, [], "no layer named 'lora_unet_blocks_0_"),
        ({"--sd_model": "NET"}, [], "--sd_model NET:"),
    ],
)
def test_bad_input_is_one_error_line(
    tmp_path, sdxl_ckpt, anima_files, capsys, overrides, extra, message
) -> None:
    net_path, foreign = tmp_path / "net.safetensors", tmp_path / "anima_net.safetensors"
    parts = load_sdxl_single_file(sdxl_ckpt)
    lora.create_network(1.0, 2, 1, None, None, parts["unet"]).save_weights(str(net_path), None, {})
    dit = load_anima_dit(anima_files[0], torch.float32)
    lora.create_network(1.0, 2, 1, None, None, dit).save_weights(str(foreign), None, {})
    names = {"SAME": str(sdxl_ckpt), "MISSING": str(tmp_path / "none.safetensors"), "FOREIGN": str(foreign),
             "NET": str(net_path), "o.ckpt": str(tmp_path / "o.ckpt")}  # fmt: skip
    args = {
        "--sd_model": str(sdxl_ckpt),
        "--save_to": str(tmp_path / "o.safetensors"),
        "--models": str(net_path),
    }
    args.update({k: names.get(v, v) for k, v in overrides.items()})
    argv = [x for kv in args.items() for x in kv] + extra
    if "invalid choice" in message:
        with pytest.raises(SystemExit) as e:
            sdxl_merge_lora.main(argv)
        code = e.value.code
    else:
        code = run_tool("sdxl_merge_lora.py", sdxl_merge_lora.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    message = message.replace("MISSING", names["MISSING"]).replace("NET", names["NET"])
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o.safetensors").exists()
