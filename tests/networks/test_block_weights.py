"""Per-block strength (networks/block_weights.py) in gen_img.py, anima_minimal_inference.py and the merge tools:
golden names map to their blocks, a block at 0 is exactly the network without those modules, all ones is
exactly the plain network, merged equals live at the same block weights, and bad strings are one error line."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import anima_minimal_inference as inf
import gen_img
from library.anima.loading import build_tiny_anima_models, load_anima_dit, save_tiny_anima_files
from library.sdxl.loading import load_sdxl_single_file
from library.tools.tool_cli import run_tool
from networks import anima_merge_lora, lora, sdxl_merge_lora
from networks.block_weights import (
    BlockWeightError,
    anima_block_of,
    parse_anima_block_weights,
    parse_sdxl_block_weights,
    sdxl_block_of,
)
from tests.anima.test_anima_inference import _argv as anima_argv
from tests.anima.test_anima_inference import make_lora_sd
from tests.helpers.sdxl_network import randomize
from tests.inference.test_gen_img_networks import _argv, _load, _outputs, _rel, files  # noqa: F401

V12 = [round(0.1 * (i + 1), 1) for i in range(12)]  # distinct values: a swapped block shows
ONES20 = ",".join(["1"] * 20)


@pytest.fixture(scope="module")
def anima_files(tmp_path_factory, tokenizers_dir):
    out = tmp_path_factory.mktemp("anima_bw")
    models = build_tiny_anima_models(tokenizers_dir, seed=0)
    paths = save_tiny_anima_files(models, out)
    paths["lora"] = out / "lora.safetensors"
    save_file(make_lora_sd(models.dit, models.text_encoder, "lora", seed=1), str(paths["lora"]))
    return paths


def _csv(values) -> str:
    return ",".join(f"{v:g}" for v in values)


def test_golden_sdxl_names_map_to_the_extension_blocks() -> None:
    golden = {
        "lora_te1_text_model_encoder_layers_0_mlp_fc1": "BASE",
        "lora_te2_text_model_encoder_layers_31_self_attn_q_proj": "BASE",
        "lora_unet_input_blocks_0_0": "IN00",
        "lora_unet_input_blocks_1_0_in_layers_2": "IN01",
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": "IN04",
        "lora_unet_input_blocks_8_1_proj_out": "IN08",
        "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2": "MID",
        "lora_unet_middle_block_0_emb_layers_1": "MID",
        "lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_k": "OUT00",
        "lora_unet_output_blocks_5_2_conv": "OUT05",
        "lora_unet_output_blocks_8_0_skip_connection": "OUT08",
        "lora_unet_time_embed_0": None,
        "lora_unet_label_emb_0_0": None,
        "lora_unet_out_2": None,
    }
    assert {n: sdxl_block_of(n) for n in golden} == golden
    w12 = parse_sdxl_block_weights("--f", _csv(V12))
    want12 = {"BASE": 0.1, "IN00": 0.0, "IN01": 0.0, "IN04": 0.2, "IN08": 0.5, "MID": 0.6, "OUT00": 0.7,
              "OUT05": 1.2, "OUT08": 0.0, None: 1.0}  # fmt: skip
    for name, block in golden.items():
        assert w12.weight_of(name) == pytest.approx(want12[block], abs=0), name
    w20 = parse_sdxl_block_weights("--f", _csv(range(20)))
    want20 = {"BASE": 0, "IN00": 1, "IN01": 2, "IN04": 5, "IN08": 9, "MID": 10, "OUT00": 11, "OUT05": 16,
              "OUT08": 19, None: 1}  # fmt: skip
    assert {n: w20.weight_of(n) for n in golden} == {n: float(want20[b]) for n, b in golden.items()}
    assert parse_sdxl_block_weights("--f", "") is None and parse_sdxl_block_weights("--f", "  ") is None


def test_golden_anima_names_map_to_te_adapter_and_blocks() -> None:
    golden = {
        "lora_te_layers_0_mlp_up_proj": "TE",
        "lora_unet_llm_adapter_blocks_0_self_attn_q_proj": "ADAPTER",
        "lora_unet_blocks_0_self_attn_q_proj": "B00",
        "lora_unet_blocks_3_cross_attn_k_proj": "B03",
        "lora_unet_blocks_27_mlp_layer2": "B27",
        "lora_unet_x_embedder_proj_1": None,
        "lora_unet_final_layer_linear": None,
    }
    assert {n: anima_block_of(n) for n in golden} == golden
    values = [0.5, 2.0] + [float(i) for i in range(28)]
    w = parse_anima_block_weights("--f", _csv(values), 28)
    want = {"TE": 0.5, "ADAPTER": 2.0, "B00": 0.0, "B03": 3.0, "B27": 27.0, None: 1.0}
    assert {n: w.weight_of(n) for n in golden} == {n: want[b] for n, b in golden.items()}


@pytest.mark.parametrize(
    "text,message",
    [
        ("1,1,1", "--f '1,1,1': 3 values; SDXL takes 12 (BASE,IN04,IN05,IN07,IN08,MID,OUT00,"),
        ("1,1,x,1,1,1,1,1,1,1,1,1", "--f '1,1,x,1,1,1,1,1,1,1,1,1': 'x' is not a number"),
        ("1,,1", "'' is not a number"),
        ("1,nan,1,1,1,1,1,1,1,1,1,1", "'nan' is not a finite number"),
    ],
)
def test_bad_strings_name_the_flag(text, message) -> None:
    with pytest.raises(BlockWeightError) as e:
        parse_sdxl_block_weights("--f", text)
    assert message in str(e.value)
    with pytest.raises(BlockWeightError, match="this Anima DiT takes 6: the text encoder, the LLM adapter"):
        parse_anima_block_weights("--f", "1,1,1", 4)


# ------------------------------------------------------------------------------------------ gen_img (SDXL)


def _lora(files, *extra: str) -> tuple[str, ...]:  # noqa: F811
    return ("--network_module", "networks.lora", "--network_weights", str(files["lora"]), *extra)


def _expected_block(name: str, values: list[float], ids: tuple[str, ...]) -> float:
    """The weight a module should get, spelled out by name prefix (independent of sdxl_block_of)."""
    prefixes = {"BASE": ("lora_te1_", "lora_te2_"), "MID": ("lora_unet_middle_block_",)}
    for i in range(9):
        prefixes[f"IN{i:02d}"] = (f"lora_unet_input_blocks_{i}_",)
        prefixes[f"OUT{i:02d}"] = (f"lora_unet_output_blocks_{i}_",)
    for block, starts in prefixes.items():
        if name.startswith(starts):
            return values[ids.index(block)] if block in ids else 0.0
    return 1.0


def test_live_multiplier_per_module_matches_the_string_and_survives_am(files) -> None:  # noqa: F811
    from networks.block_weights import SDXL_IDS_12

    _, nets = _load(files, *_lora(files, "--network_mul", "0.5", "--network_block_weights", _csv(V12)))
    net = nets[0].network
    seen = set()
    for m in net.all_loras:
        assert m.multiplier == 0.5 * _expected_block(m.lora_name, V12, SDXL_IDS_12), m.lora_name
        seen.add(sdxl_block_of(m.lora_name))
    assert len(seen) == 19  # BASE, IN01..IN08, MID, OUT00..OUT08: every block but IN00 (conv_in) has modules
    net.set_multiplier(2.0)  # what a prompt's --am does per batch: block weights are kept
    assert all(m.multiplier == 2.0 * _expected_block(m.lora_name, V12, SDXL_IDS_12) for m in net.all_loras)


def _without(files, tmp_path, starts: tuple[str, ...]):  # noqa: F811
    sd = load_file(files["lora"])
    kept = {k: v for k, v in sd.items() if not k.startswith(starts)}
    assert 0 < len(kept) < len(sd)
    path = tmp_path / "without.safetensors"
    save_file(kept, str(path))
    return path


@pytest.mark.parametrize("merge", [False, True])
def test_block_at_zero_equals_removing_its_modules_and_ones_equal_plain(files, tmp_path, merge) -> None:  # noqa: F811
    extra = ("--network_merge",) if merge else ()
    plain = _outputs(_load(files, *_lora(files, *extra))[0])
    ones = _outputs(_load(files, *_lora(files, *extra, "--network_block_weights", ONES20))[0])
    assert all(torch.equal(plain[k], ones[k]) for k in plain)
    # MID and BASE at 0 (20-value form) == a file without the middle-block and text-encoder modules
    spec = ["0"] + ["1"] * 9 + ["0"] + ["1"] * 9
    zeroed = _outputs(_load(files, *_lora(files, *extra, "--network_block_weights", ",".join(spec)))[0])
    path = _without(files, tmp_path, ("lora_unet_middle_block_", "lora_te"))
    removed = _outputs(
        _load(files, "--network_module", "networks.lora", "--network_weights", str(path), *extra)[0]
    )
    assert all(torch.equal(zeroed[k], removed[k]) for k in plain)
    assert _rel(zeroed["unet"], plain["unet"]) > 1e-3 and _rel(zeroed["te1"], plain["te1"]) > 1e-2
    # the 12-value form gives the blocks it does not list 0, as the block-weight extension does
    twelve = _outputs(_load(files, *_lora(files, *extra, "--network_block_weights", ",".join(["1"] * 12)))[0])
    spec20 = ["1"] + ["0", "0", "0", "0", "1", "1", "0", "1", "1"] + ["1"] + ["1"] * 6 + ["0"] * 3
    same = _outputs(_load(files, *_lora(files, *extra, "--network_block_weights", ",".join(spec20)))[0])
    assert all(torch.equal(twelve[k], same[k]) for k in plain)


def test_merged_equals_live_with_the_same_block_weights(files) -> None:  # noqa: F811
    bw = ("--network_block_weights", _csv(V12), "")  # the second network at plain strength
    both = ("--network_module", "networks.lora", "networks.lokr", "--network_weights", str(files["lora"]),
            str(files["lokr"]), "--network_mul", "0.8", "-0.5", *bw)  # fmt: skip
    live = _outputs(_load(files, *both)[0])
    merged = _outputs(_load(files, *both, "--network_merge")[0])
    plain = _outputs(_load(files, *both[:-3])[0])
    for part in ("unet", "te1", "te2"):
        assert _rel(merged[part], live[part]) < 1e-4, part  # fp32 merge vs fp32 forward, as without weights
        assert _rel(live[part], plain[part]) > 1e-3, part  # the weights really change the output


def test_gen_img_bad_block_weights_are_one_error_naming_the_flag(files, capsys) -> None:  # noqa: F811
    def err(*extra: str) -> str:
        with pytest.raises(SystemExit) as e:
            gen_img.parse_args([*_argv(files, "--prompt", "x"), *extra])
        assert e.value.code == 2
        out = capsys.readouterr().err
        assert "Traceback" not in out
        return out.strip().splitlines()[-1]

    assert "--network_block_weights '1,2': 2 values; SDXL takes 12" in err(
        *_lora(files, "--network_block_weights", "1,2")
    )
    assert "'a' is not a number" in err(*_lora(files, "--network_block_weights", "a," + ",".join(["1"] * 11)))
    assert "--network_block_weights: 2 string(s) for 1 networks" in err(
        *_lora(files, "--network_block_weights", ONES20, ONES20)
    )
    assert "network options given without --network_module" in err("--network_block_weights", ONES20)


# ------------------------------------------------------------------------------------------ merge tools


def test_sdxl_merge_tool_block_weights(files, tmp_path, capsys) -> None:  # noqa: F811
    base = load_sdxl_single_file(files["ckpt"])
    tes = [base["text_encoder_1"], base["text_encoder_2"]]
    net, sd = lora.create_network_from_weights(
        0.7, str(files["lora"]), None, tes, base["unet"], for_inference=True
    )
    net.load_state_dict(sd)  # the module tensors (create_network_from_weights only shapes them)
    out = tmp_path / "merged.safetensors"
    argv = ["--sd_model", str(files["ckpt"]), "--save_to", str(out), "--models", str(files["lora"]),
            "--ratios", "0.7", "--block_weights", _csv(V12)]  # fmt: skip
    assert sdxl_merge_lora.main(argv) == 0
    merged = load_sdxl_single_file(out)
    m_tes = [merged["text_encoder_1"], merged["text_encoder_2"]]
    m_net, _ = lora.create_network_from_weights(
        1.0, str(files["lora"]), None, m_tes, merged["unet"], for_inference=True
    )
    got = {m.lora_name: m.org_module.weight.detach() for m in m_net.all_loras}
    from networks.block_weights import SDXL_IDS_12

    zero = 0
    for m in net.all_loras:
        w = _expected_block(m.lora_name, V12, SDXL_IDS_12)
        if w == 0:  # a block at 0 leaves the base weight bit for bit
            assert torch.equal(got[m.lora_name], m.org_module.weight.detach()), m.lora_name
            zero += 1
            continue
        want = (m.org_module.weight + m.delta_weight(0.7 * w)).detach()
        assert _rel(got[m.lora_name], want) < 1e-6, m.lora_name
    assert zero == 20  # the 12-value form's unlisted blocks: IN01-IN03, IN06 (8 modules), OUT06-OUT08 (12)
    bad = argv[:-1] + ["1,2,3"]
    assert run_tool("sdxl_merge_lora.py", sdxl_merge_lora.main, bad) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--block_weights '1,2,3': 3 values; SDXL takes 12" in lines[0], lines


def test_anima_block_weights_merged_equal_live_and_merge_tool(anima_files, tmp_path, capsys) -> None:
    """anima_minimal_inference's merge at block weights == the live network at the same weights (DiT forward),
    and anima_merge_lora.py --block_weights writes the same DiT weights."""
    live = load_anima_dit(anima_files["dit"], torch.float32)
    n_blocks = len(live.blocks)
    net = lora.create_network(0.8, 4, 3, None, [], live, train_llm_adapter="True")
    randomize(net, seed=5, std=0.2)
    path = tmp_path / "a.safetensors"
    net.save_weights(str(path), None, {})
    values = [1.0, 0.0] + [0.5 * (i % 3) for i in range(n_blocks)]  # adapter off, block 0 off, others 0.5 / 1
    bw = parse_anima_block_weights("--lora_block_weights", _csv(values), n_blocks)
    net.set_block_weights(bw.weight_of)
    net.apply_to([], live, apply_text_encoder=False, apply_unet=True)
    merged = load_anima_dit(anima_files["dit"], torch.float32)
    inf.apply_lora_files(merged, None, [str(path)], [0.8], block_weights=[bw])
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(1, 16, 1, 8, 8, generator=g), torch.tensor([0.6])
    ctx = torch.randn(1, 32, 32, generator=g)
    ids, mask = torch.randint(0, 32000, (1, 32), generator=g), torch.ones(1, 32)
    base = load_anima_dit(anima_files["dit"], torch.float32)
    with torch.no_grad():
        want, got, plain = (
            m(x, t, ctx, target_input_ids=ids, target_attention_mask=mask) for m in (live, merged, base)
        )
    assert (want - plain).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    base_w = dict(base.named_parameters())
    merged_w = dict(merged.named_parameters())
    for name in base_w:  # adapter and block 0 at 0: their weights are untouched, bit for bit
        if name.startswith(("llm_adapter.", "blocks.0.")):
            assert torch.equal(merged_w[name], base_w[name]), name
    out = tmp_path / "dit_m.safetensors"
    argv = ["--dit", str(anima_files["dit"]), "--save_to", str(out), "--models", str(path), "--ratios", "0.8",
            "--block_weights", _csv(values)]  # fmt: skip
    assert anima_merge_lora.main(argv) == 0
    tool = dict(load_anima_dit(out, torch.float32).named_parameters())
    assert all(torch.equal(tool[n], merged_w[n]) for n in merged_w)
    bad = argv[:-1] + ["1,1"]
    assert run_tool("anima_merge_lora.py", anima_merge_lora.main, bad) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    want_msg = f"--block_weights '1,1': 2 values; this Anima DiT takes {n_blocks + 2}"
    assert len(lines) == 1 and want_msg in lines[0], lines


def test_anima_inference_bad_block_weights(anima_files, tmp_path) -> None:
    lw = ["--lora_weight", str(anima_files["lora"])]
    with pytest.raises(BlockWeightError, match="--lora_block_weights '1,x': 'x' is not a number"):
        inf.main(anima_argv(anima_files, tmp_path / "o", *lw, "--lora_block_weights", "1,x"))
    with pytest.raises(BlockWeightError, match="--lora_block_weights: 2 string"):
        inf.main(anima_argv(anima_files, tmp_path / "o", *lw, "--lora_block_weights", "1", "1"))
    with pytest.raises(BlockWeightError, match="--lora_block_weights '1,1': 2 values; this Anima DiT takes"):
        inf.main(anima_argv(anima_files, tmp_path / "o", *lw, "--lora_block_weights", "1,1"))
    assert not (tmp_path / "o").exists()
