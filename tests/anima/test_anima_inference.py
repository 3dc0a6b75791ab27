"""anima_minimal_inference.py on a tiny Anima: LoRA/LoHa/LoKr merging, sampler, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

import anima_minimal_inference as inf
from library.anima.loading import build_tiny_anima_models, load_anima_dit, save_tiny_anima_files
from library.anima.sampling import check_image_size, euler_sample, shifted_sigmas
from library.inference.lora_merge import merge_into_modules

DIT_TARGETS = ("self_attn.q_proj", "cross_attn.k_proj", "mlp.layer1", "mlp.layer2")


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizers_dir) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("anima")
    models = build_tiny_anima_models(tokenizers_dir, seed=0)
    paths = save_tiny_anima_files(models, out)
    for algo in ("lora", "loha", "lokr"):
        sd = make_lora_sd(models.dit, models.text_encoder, algo, seed={"lora": 1, "loha": 2, "lokr": 3}[algo])
        save_file(sd, str(out / f"{algo}.safetensors"))
        paths[algo] = out / f"{algo}.safetensors"
    return paths


def _targets(dit: nn.Module, te: nn.Module | None):
    for path, mod in dit.named_modules():
        if isinstance(mod, nn.Linear) and path.startswith(("blocks.", "llm_adapter.blocks.")):
            if path.endswith(DIT_TARGETS) or path.endswith("mlp.0"):
                yield "lora_unet_" + path.replace(".", "_"), mod
    if te is not None:
        for path, mod in te.named_modules():
            if isinstance(mod, nn.Linear) and path.endswith(("q_proj", "up_proj")):
                yield "lora_te_" + path.replace(".", "_"), mod


def make_lora_sd(dit: nn.Module, te: nn.Module | None, algo: str, seed: int, rank: int = 4) -> dict:
    """Non-trivial factors (trained-looking) for a few DiT, adapter and TE modules."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, lin in _targets(dit, te):
        o, i = lin.weight.shape
        if algo == "lora":
            sd[name + ".lora_down.weight"] = torch.randn(rank, i, generator=g) * 0.3
            sd[name + ".lora_up.weight"] = torch.randn(o, rank, generator=g) * 0.3
        elif algo == "loha":
            for k, shp in (
                ("w1_a", (o, rank)),
                ("w1_b", (rank, i)),
                ("w2_a", (o, rank)),
                ("w2_b", (rank, i)),
            ):
                sd[f"{name}.hada_{k}"] = torch.randn(*shp, generator=g) * 0.5
        else:
            sd[name + ".lokr_w1"] = torch.randn(4, 4, generator=g)
            sd[name + ".lokr_w2_a"] = torch.randn(o // 4, 2, generator=g) * 0.3
            sd[name + ".lokr_w2_b"] = torch.randn(2, i // 4, generator=g) * 0.3
        sd[name + ".alpha"] = torch.tensor(2.0)
    return sd


def expected_delta(sd: dict, name: str) -> torch.Tensor:
    """ΔW written out independently of library.inference.lora_merge (spec anima.md §3)."""
    t = {k[len(name) + 1 :]: v.double() for k, v in sd.items() if k.startswith(name + ".")}
    if "lora_down.weight" in t:
        return t["lora_up.weight"] @ t["lora_down.weight"] * (t["alpha"] / t["lora_down.weight"].shape[0])
    if "hada_w1_a" in t:
        r = t["hada_w1_b"].shape[0]
        return (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * (t["alpha"] / r)
    w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    return torch.kron(t["lokr_w1"], w2) * (t["alpha"] / t["lokr_w2_b"].shape[0])


def _argv(files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "--dit", str(files["dit"]), "--vae", str(files["vae"]), "--text_encoder", str(files["text_encoder"]),
        "--t5_tokenizer_path", str(files["t5_tokenizer"]),
        "--prompt", "a red cat", "--negative_prompt", "blurry",
        "--image_size", "64", "64", "--infer_steps", "2", "--guidance_scale", "4.0", "--flow_shift", "3.0",
        "--seed", "7", "--save_path", str(out), "--dtype", "fp32", "--max_token_length", "32",
        "--output_type", "latent_images", *extra,
    ]  # fmt: skip


def _latent(paths: list[Path]) -> torch.Tensor:
    return load_file(str(next(p for p in paths if p.suffix == ".safetensors")))["latent"]


def test_sigma_schedule_and_sizes():
    s = shifted_sigmas(4, 3.0)
    want = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    torch.testing.assert_close(s, 3 * want / (1 + 2 * want))
    torch.testing.assert_close(shifted_sigmas(4, 1.0), want)
    with pytest.raises(ValueError, match="multiple of 16"):
        check_image_size(1000, 1024)


def test_euler_cfg_maths():
    """A velocity field v = c * x: each step scales x by 1 - ds * (v_u + g (v_c - v_u)) / x."""
    x0 = torch.ones(1, 16, 1, 2, 2)
    ctx, neg = torch.tensor(2.0), torch.tensor(0.5)
    out = euler_sample(lambda x, t, c: c * x, x0, ctx, neg, steps=2, guidance_scale=3.0, flow_shift=1.0)
    k = 0.5 + 3.0 * (2.0 - 0.5)  # effective velocity factor
    torch.testing.assert_close(out, x0 * (1 - 0.5 * k) * (1 - 0.5 * k))
    no_cfg = euler_sample(lambda x, t, c: c * x, x0, ctx, neg, steps=2, guidance_scale=1.0, flow_shift=1.0)
    torch.testing.assert_close(no_cfg, x0 * (1 - 0.5 * 2.0) ** 2)


def test_multiplier_zero_is_base_and_algorithms_change_output(files, tmp_path):
    base = inf.main(_argv(files, tmp_path / "base"))
    png = next(p for p in base if p.suffix == ".png")
    img = Image.open(png)
    assert img.size == (64, 64)
    assert (
        img.text["prompt"] == "a red cat"
        and img.text["seed"] == "7"
        and img.text["negative-prompt"] == "blurry"
    )
    z0 = _latent(base)
    assert z0.shape == (1, 16, 1, 8, 8) and torch.isfinite(z0).all()
    zero = inf.main(
        _argv(files, tmp_path / "zero", "--lora_weight", str(files["lora"]), "--lora_multiplier", "0")
    )
    assert torch.equal(_latent(zero), z0)
    for algo in ("lora", "loha", "lokr"):
        got = _latent(inf.main(_argv(files, tmp_path / algo, "--lora_weight", str(files[algo]))))
        rel = ((got - z0).norm() / z0.norm()).item()
        assert rel > 1e-3, (algo, rel)


def test_merged_weights_equal_forward_with_adapters(files, tokenizers_dir):
    """Merging (LoRA, then LoHa x0.6) gives the same DiT output as base + Σ m·ΔW·x hooks."""
    models = build_tiny_anima_models(tokenizers_dir, seed=0)
    dit = load_anima_dit(files["dit"], torch.float32)
    ref = load_anima_dit(files["dit"], torch.float32)
    sds = [(load_file(str(files["lora"])), 1.0), (load_file(str(files["loha"])), 0.6)]
    reports = [
        merge_into_modules([("lora_unet", dit), ("lora_te", models.text_encoder)], sd, m) for sd, m in sds
    ]
    n = 2 * 4 + 2 * 3 + 2 * 2  # DiT blocks, adapter blocks, Qwen3 layers
    assert [r.by_algo for r in reports] == [{"lora": n}, {"loha": n}]
    assert all(not r.unused for r in reports)
    hooks = []
    for name, lin in _targets(ref, None):
        delta = sum(m * expected_delta(sd, name) for sd, m in sds).float()
        hooks.append(lin.register_forward_hook(lambda mod, a, y, d=delta: y + a[0] @ d.T))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 1, 8, 8, generator=g), torch.tensor([0.3, 0.9])
    ctx = torch.randn(2, 32, 32, generator=g)
    ids, mask = torch.randint(0, 32000, (2, 32), generator=g), torch.ones(2, 32)
    with torch.no_grad():
        want = ref(x, t, ctx, target_input_ids=ids, target_attention_mask=mask)
        got = dit(x, t, ctx, target_input_ids=ids, target_attention_mask=mask)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        assert (got - ref(x, t, ctx, target_input_ids=ids, target_attention_mask=mask)).abs().max() > 1e-2


def test_two_files_stack_and_lokr_merge(files):
    dit = load_anima_dit(files["dit"], torch.float32)
    base = {n: m.weight.detach().clone() for n, m in _targets(dit, None)}
    a, b = load_file(str(files["lora"])), load_file(str(files["lokr"]))
    inf.apply_lora_files(dit, None, [str(files["lora"]), str(files["lokr"])], [1.0, 0.6, 9.0])
    for name, mod in _targets(dit, None):
        want = base[name].double() + expected_delta(a, name) + 0.6 * expected_delta(b, name)
        torch.testing.assert_close(mod.weight.double(), want, rtol=1e-5, atol=1e-5)


def test_comfy_format_file_is_converted(files, tmp_path):
    from networks.convert_anima_lora_to_comfy import to_comfy

    sd = load_file(str(files["lora"]))
    comfy = tmp_path / "comfy.safetensors"
    save_file(to_comfy({k: v for k, v in sd.items() if k.startswith("lora_unet")}), str(comfy))
    d1, d2 = load_anima_dit(files["dit"], torch.float32), load_anima_dit(files["dit"], torch.float32)
    r1 = inf.apply_lora_files(d1, None, [str(comfy)], None)
    r2 = inf.apply_lora_files(d2, None, [str(files["lora"])], None)
    assert r1[0].matched == r2[0].matched == 2 * 4 + 2 * 3
    for (n, p1), (_, p2) in zip(d1.named_parameters(), d2.named_parameters()):
        assert torch.equal(p1, p2), n


def test_bad_inputs(files, tmp_path):
    sdxl = tmp_path / "sdxl.safetensors"
    save_file(
        {
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 8),
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
        },
        str(sdxl),
    )
    with pytest.raises(ValueError, match="SDXL LoRA"):
        inf.main(_argv(files, tmp_path / "o", "--lora_weight", str(sdxl)))
    nomatch = tmp_path / "nomatch.safetensors"
    save_file({"lora_unet_blocks_9_self_attn_q_proj.lora_down.weight": torch.zeros(4, 64),
               "lora_unet_blocks_9_self_attn_q_proj.lora_up.weight": torch.zeros(64, 4)}, str(nomatch))  # fmt: skip
    with pytest.raises(ValueError, match="none of its 2 keys match an Anima module"):
        inf.main(_argv(files, tmp_path / "o", "--lora_weight", str(nomatch)))
    with pytest.raises(ValueError, match="height 72 is not a positive multiple of 16"):
        inf.main(_argv(files, tmp_path / "o") + ["--image_size", "72", "64"])
    argv = _argv(files, tmp_path / "o")
    argv[argv.index("--text_encoder") + 1] = str(tmp_path / "missing_qwen3")
    with pytest.raises(FileNotFoundError, match="--text_encoder"):
        inf.main(argv)
    assert not (tmp_path / "o").exists()  # no partial output, not even an empty --save_path folder
    with pytest.raises(SystemExit):  # argparse: --text_encoder is required
        inf.main(
            [
                a
                for a in _argv(files, tmp_path / "o")
                if a != "--text_encoder" and a != str(files["text_encoder"])
            ]
        )


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
def test_merge_equals_live_network_forward(files, tmp_path, algo):
    """A file saved by our network modules, merged by the inference path, reproduces the live network."""
    import importlib

    mod = importlib.import_module(f"networks.{algo}")
    live = load_anima_dit(files["dit"], torch.float32)
    net = mod.create_network(0.8, 4, 3, None, [], live, train_llm_adapter="True")
    net.apply_to([], live, apply_text_encoder=False, apply_unet=True)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    path = tmp_path / f"{algo}.safetensors"
    net.save_weights(str(path), None, {"ss_network_module": f"networks.{algo}"})
    merged = load_anima_dit(files["dit"], torch.float32)
    rep = inf.apply_lora_files(merged, None, [str(path)], [0.8])[0]
    assert rep.by_algo == {algo: 2 * 10 + 2 * 10} and not rep.unused
    x, t = torch.randn(1, 16, 1, 8, 8, generator=g), torch.tensor([0.6])
    ctx = torch.randn(1, 32, 32, generator=g)
    ids, mask = torch.randint(0, 32000, (1, 32), generator=g), torch.ones(1, 32)
    with torch.no_grad():
        want = live(x, t, ctx, target_input_ids=ids, target_attention_mask=mask)
        got = merged(x, t, ctx, target_input_ids=ids, target_attention_mask=mask)
        base = load_anima_dit(files["dit"], torch.float32)(
            x, t, ctx, target_input_ids=ids, target_attention_mask=mask
        )
    assert (want - base).abs().max() > 1e-2  # the network really changes the output
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_single_file_text_encoder_and_diffusers_vae_give_same_image(files, tmp_path, tokenizers_dir):
    """TE LoRA merges into a single-file Qwen3 as into the folder; diffusers-named VAE == Wan-named VAE."""
    lora = ["--lora_weight", str(files["lora"])]
    a = _latent(inf.main(_argv(files, tmp_path / "a", *lora)))
    argv = _argv(files, tmp_path / "b", *lora, "--qwen3_tokenizer_path", str(tokenizers_dir / "qwen3_06b"))
    argv[argv.index("--text_encoder") + 1] = str(files["text_encoder_file"])
    argv[argv.index("--vae") + 1] = str(files["vae_diffusers"])
    b = inf.main(argv)
    assert torch.equal(_latent(b), a)
    te_only = {k: v for k, v in load_file(str(files["lora"])).items() if k.startswith("lora_te_")}
    save_file(te_only, str(tmp_path / "te.safetensors"))
    c = _latent(inf.main(_argv(files, tmp_path / "c", "--lora_weight", str(tmp_path / "te.safetensors"))))
    base = _latent(inf.main(_argv(files, tmp_path / "d")))
    assert not torch.equal(c, base)  # a text-encoder-only LoRA changes the image


def test_from_file_and_latent_path(files, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text(
        "a red cat --w 48 --h 32 --d 3 --s 1 --g 1.0\n# skipped\nblue dog --n ugly --fs 2 --d 4\n"
    )
    argv = [a for a in _argv(files, tmp_path / "o") if a not in ("--prompt", "a red cat")]
    out = inf.main(argv + ["--from_file", str(prompts)])
    pngs = [p for p in out if p.suffix == ".png"]
    assert [Image.open(p).size for p in pngs] == [(48, 32), (64, 64)]
    assert [Image.open(p).text["seed"] for p in pngs] == ["3", "4"]
    assert Image.open(pngs[1]).text["negative-prompt"] == "ugly"
    # decoding a saved latent reproduces the PNG written alongside it
    lat = next(p for p in out if p.suffix == ".safetensors")
    dec = inf.main(argv + ["--latent_path", str(lat), "--save_path", str(tmp_path / "dec")])
    assert np.array_equal(np.array(Image.open(dec[0])), np.array(Image.open(pngs[0])))
    bad = tmp_path / "bad.txt"
    bad.write_text("x --zz 3\n")
    with pytest.raises(ValueError, match="unknown option --zz"):
        inf.main(argv + ["--from_file", str(bad)])
