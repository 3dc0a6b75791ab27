"""networks/resize_lora.py: LoRA / LoHa / LoKr (SDXL, Anima) to a plain LoRA by truncated SVD. The reported
relative error equals the discarded singular values' share (Eckart–Young, checked against an independent SVD
of the source ΔW in fp64), the saved file rebuilds that ΔW through our loader, several files merge with their
ratios, the dynamic rank rules pick what they promise, the output loads in diffusers' SDXL loader with the
same result as ours, and every bad input is one error line."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen3ForCausalLM

from library.anima.loading import tiny_qwen3_config
from library.anima.model import Anima, tiny_anima_config
from library.tools.lora_svd import choose_rank, truncated_lora
from library.tools.tool_cli import run_tool
from networks import loha, lokr, lora
from networks.resize_lora import load_deltas, main, overall_rel_error, resize_deltas
from tests.helpers.sdxl_network import build_tiny_sdxl, randomize, run_tes, run_unet, unet_inputs


@pytest.fixture(scope="module")
def sdxl():
    return build_tiny_sdxl()


def _save(net, path, dtype=None) -> dict[str, torch.Tensor]:
    randomize(net, std=0.2)
    net.save_weights(str(path), dtype, {"ss_network_module": "x", "ss_network_args": "{}", "ss_seed": "7"})
    return {m.lora_name: m.delta_weight(1.0).detach().double() for m in net.all_loras}


def _file_deltas(path, model_tes, model_unet) -> dict[str, torch.Tensor]:
    net, _ = lora.create_network_from_weights(1.0, str(path), None, model_tes, model_unet)
    net.load_weights(str(path))
    return {m.lora_name: m.delta_weight(1.0).detach().double() for m in net.all_loras}


def test_eckart_young_share_and_file_roundtrip(tmp_path, sdxl) -> None:
    src = tmp_path / "loha.safetensors"
    want = _save(loha.create_network(1.0, 4, 2, None, sdxl.tes, sdxl.unet, conv_dim=2, use_tucker=True), src)
    deltas, _ = load_deltas([str(src)], [1.0], torch.float64)
    assert set(deltas) == set(want)
    factors = resize_deltas(deltas, 3, 2)
    for name, f in factors.items():
        dw = want[name]
        assert float((deltas[name] - dw).abs().max()) <= 1e-6 * float(dw.abs().max())  # fp32 factors → fp64
        s = torch.linalg.svdvals(deltas[name].reshape(dw.shape[0], -1))
        r = 2 if dw.dim() == 4 and dw.shape[2:] != (1, 1) else 3
        assert f.rank == min(r, s.numel())
        share = float(s[f.rank :].square().sum().sqrt() / s.square().sum().sqrt())
        approx = (f.up.reshape(dw.shape[0], -1) @ f.down.reshape(f.rank, -1)).reshape(dw.shape)
        actual = float((approx - deltas[name]).norm() / deltas[name].norm())
        assert actual == pytest.approx(share, rel=1e-9, abs=1e-12) and f.rel_error == pytest.approx(
            share, rel=1e-9
        )
    total = math.sqrt(sum(float((f.error) ** 2) for f in factors.values()))
    assert overall_rel_error(factors) == pytest.approx(
        total / math.sqrt(sum(f.norm**2 for f in factors.values()))
    )
    # the CLI writes it; our loader rebuilds ΔW_r (fp32 file: rounding only)
    out = tmp_path / "lora.safetensors"
    assert (
        main(
            [
                "--model",
                str(src),
                "--save_to",
                str(out),
                "--new_rank",
                "3",
                "--new_conv_rank",
                "2",
                "--precision",
                "double",
            ]
        )
        == 0
    )
    got = _file_deltas(out, sdxl.tes, sdxl.unet)
    for name, f in factors.items():
        approx = (f.up.reshape(f.up.shape[0], -1) @ f.down.reshape(f.rank, -1)).reshape(got[name].shape)
        assert float((got[name] - approx).norm() / approx.norm()) < 1e-6
    sd = load_file(str(out))
    assert all(float(sd[f"{n}.alpha"]) == f.rank for n, f in factors.items())


def test_full_rank_is_exact_and_lokr_converts(tmp_path, sdxl) -> None:
    src = tmp_path / "lora.safetensors"
    want = _save(lora.create_network(1.0, 4, 1, None, None, sdxl.unet), src)
    factors = resize_deltas(load_deltas([str(src)], [1.0], torch.float64)[0], 4, 4)
    assert max(f.rel_error for f in factors.values()) < 1e-12  # rank-4 ΔW kept at rank 4
    src2 = tmp_path / "lokr.safetensors"
    want2 = _save(
        lokr.create_network(1.0, 4, 2, None, None, sdxl.unet, factor=4, conv_dim=2, use_tucker=True), src2
    )
    deltas2, _ = load_deltas([str(src2)], [1.0], torch.float64)
    full = resize_deltas(deltas2, 64, 64)  # every module at its full rank: exact
    assert max(f.rel_error for f in full.values()) < 1e-12
    assert max(float((deltas2[n] - want2[n]).norm() / want2[n].norm()) for n in want2) < 1e-6
    assert set(want) <= set(want2)


def test_merge_several_files_with_ratios(tmp_path, sdxl) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    da = _save(lora.create_network(1.0, 4, 1, None, None, sdxl.unet), a)
    db = _save(lokr.create_network(1.0, 4, 2, None, None, sdxl.unet, factor=4), b, torch.bfloat16)
    out = tmp_path / "ab.safetensors"
    assert main(["--models", str(a), str(b), "--ratios", "1", "-0.5", "--save_to", str(out), "--new_rank", "200",
                 "--save_precision", "float", "--precision", "double"]) == 0  # fmt: skip
    got = _file_deltas(out, None, sdxl.unet)
    for name in da:  # rank 200 ≥ every layer's size here: the merge itself, to bf16 rounding of b's factors
        want = da[name] - 0.5 * db[name]
        assert float((got[name] - want).norm() / want.norm()) < 2e-2
    bf = load_deltas([str(b)], [1.0], torch.float64)[0]
    for name in da:
        want = da[name] - 0.5 * bf[name]  # b as saved (bf16): fp32 rounding only
        assert float((got[name] - want).norm() / want.norm()) < 1e-6


def test_dynamic_rank_rules() -> None:
    s = torch.tensor([8.0, 4.0, 2.0, 1.0], dtype=torch.float64)
    assert choose_rank(s, 10, "sv_ratio", 3.0) == 2  # σ > 8/3
    assert choose_rank(s, 10, "sv_ratio", 8.0) == 3  # σ > 1 (strict)
    assert choose_rank(s, 10, "sv_fro", 0.9) == 2  # √(80/85) = 0.970 ≥ 0.9 > √(64/85) = 0.868
    assert choose_rank(s, 10, "sv_fro", 0.98) == 3  # √(84/85) = 0.994
    assert choose_rank(s, 10, "sv_cumulative", 0.9) == 3  # 14/15 ≥ 0.9 > 12/15
    assert choose_rank(s, 1, "sv_cumulative", 0.9) == 1  # --new_rank caps it
    assert choose_rank(s, 10) == 4
    g = torch.Generator().manual_seed(0)
    dw = torch.randn(12, 5, 3, 3, generator=g, dtype=torch.float64)
    f = truncated_lora(dw, 3, "sv_fro", 0.5)
    assert f.down.shape == (f.rank, 5, 3, 3) and f.up.shape == (12, f.rank, 1, 1)
    assert f.fro_retained >= 0.5 and truncated_lora(dw, 3, "sv_fro", 0.5).rank == choose_rank(
        torch.linalg.svdvals(dw.reshape(12, -1)), 3, "sv_fro", 0.5
    )
    zero = truncated_lora(torch.zeros(4, 6), 2)
    assert zero.rank == 1 and zero.rel_error == 0.0 and not zero.up.any()


def test_anima_lokr_to_lora(tmp_path) -> None:
    torch.manual_seed(0)
    dit, qwen = (
        Anima(tiny_anima_config()).eval(),
        Qwen3ForCausalLM(tiny_qwen3_config(vocab_size=64)).model.eval(),
    )
    src = tmp_path / "anima.safetensors"
    want = _save(lokr.create_network(1.0, 4, 2, None, [qwen], dit, factor=4), src)
    out = tmp_path / "anima_lora.safetensors"
    assert (
        main(["--model", str(src), "--save_to", str(out), "--new_rank", "64", "--precision", "double"]) == 0
    )
    got = _file_deltas(out, [qwen], dit)
    assert set(got) == set(want)
    assert max(float((got[n] - want[n]).norm() / want[n].norm()) for n in want) < 1e-6


def test_output_loads_in_diffusers_like_ours(tmp_path, sdxl) -> None:
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin as Sdxl

    src, out = tmp_path / "loha.safetensors", tmp_path / "lora.safetensors"
    _save(loha.create_network(1.0, 4, 2, None, sdxl.tes, sdxl.unet, conv_dim=2), src)
    assert main(["--model", str(src), "--save_to", str(out), "--new_rank", "3"]) == 0
    sd = load_file(str(out))
    ours = sdxl.clone()
    net, _ = lora.create_network_from_weights(1.0, None, None, ours.tes, ours.unet, weights_sd=dict(sd))
    net.merge_to(ours.tes, ours.unet, dict(sd))
    theirs = sdxl.clone()
    state, alphas = Sdxl.lora_state_dict(dict(sd), unet_config=theirs.unet.config)  # raises on a leftover key
    Sdxl.load_lora_into_unet(
        {k: v for k, v in state.items() if k.startswith("unet.")}, alphas, unet=theirs.unet
    )
    for te, prefix in ((theirs.te1, "text_encoder"), (theirs.te2, "text_encoder_2")):
        part = {k: v for k, v in state.items() if k.startswith(prefix + ".")}
        Sdxl.load_lora_into_text_encoder(part, alphas, text_encoder=te, prefix=prefix)
    inputs = unet_inputs()
    base, want, got = run_unet(sdxl.unet, inputs), run_unet(ours.unet, inputs), run_unet(theirs.unet, inputs)
    assert float((got - want).norm()) < 1e-3 * float((want - base).norm())  # every module applied, same ΔW
    for g, w, b in zip(run_tes(theirs), run_tes(ours), run_tes(sdxl)):
        assert float((g - w).norm()) < 1e-3 * float((w - b).norm())


@pytest.mark.parametrize(
    "args,message",
    [
        (["--save_to", "o.safetensors"], "give the input with --model FILE or --models"),
        (["--model", "SRC", "--save_to", "o.safetensors", "--new_rank", "0"], "expected ranks >= 1"),
        (
            ["--model", "SRC", "--save_to", "o.safetensors", "--dynamic_method", "sv_fro"],
            "needs --dynamic_param",
        ),
        (
            [
                "--model",
                "SRC",
                "--save_to",
                "o.safetensors",
                "--dynamic_method",
                "sv_fro",
                "--dynamic_param",
                "2",
            ],
            "sv_fro expects a share in (0, 1]",
        ),  # fmt: skip
        (
            [
                "--model",
                "SRC",
                "--save_to",
                "o.safetensors",
                "--dynamic_method",
                "sv_ratio",
                "--dynamic_param",
                "0.5",
            ],
            "expected a ratio >= 1",
        ),  # fmt: skip
        (
            ["--model", "SRC", "--save_to", "o.safetensors", "--dynamic_param", "0.5"],
            "only used with --dynamic_method",
        ),
        (
            ["--models", "SRC", "SRC", "--ratios", "1", "--save_to", "o.safetensors"],
            "--ratios: 1 value(s) given for 2",
        ),
        (["--model", "SRC", "--save_to", "o.ckpt"], "expected a .safetensors path"),
        (["--model", "MISSING", "--save_to", "o.safetensors"], "does not exist"),
        (["--model", "BAD", "--save_to", "o.safetensors"], "lora_up.weight: missing"),
        (
            ["--model", "SRC", "--save_to", "o.safetensors", "--dynamic_method", "nope"],
            "invalid choice: 'nope'",
        ),
    ],
)
def test_bad_input_is_one_error_line(tmp_path, sdxl, capsys, args, message) -> None:
    src, bad = tmp_path / "src.safetensors", tmp_path / "bad.safetensors"
    net = lora.create_network(1.0, 2, 1, None, None, sdxl.unet)
    net.save_weights(str(src), None, {})
    sd = net.file_state_dict()
    del sd[next(k for k in sd if k.endswith("lora_up.weight"))]
    from safetensors.torch import save_file

    save_file(sd, str(bad))
    paths = {"SRC": str(src), "BAD": str(bad), "MISSING": str(tmp_path / "none.safetensors")}
    argv = [paths.get(a, a) for a in args]
    argv = [str(tmp_path / a) if a.startswith("o.") else a for a in argv]
    code = run_tool("resize_lora.py", main, argv) if "invalid choice" not in message else None
    if code is None:
        with pytest.raises(SystemExit) as e:
            main(argv)
        code = e.value.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o.safetensors").exists()
