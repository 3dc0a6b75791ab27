"""CPU smoke runs of the benchmarks (tiny configs, 2 steps) so they never rot."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# started when the tests are collected (tests/helpers/triton_interpreter.py)
INTERPRETER_CASES = ("bench/bench_loha_delta.py", "--smoke")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_train_step_bench_smoke(capsys):
    bench = _load("bench_train_step")
    variants = "anima-floor,anima-lokr:path=bypass,ours-lora"  # one process each: three keep it short
    results = bench.main(
        [
            "--tiny",
            "--device",
            "cpu",
            "--dtype",
            "fp32",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--variants",
            variants,
        ]
    )
    by = {r["variant"]: r for r in results}
    assert list(by) == variants.split(","), results
    for r in results:
        assert "error" not in r, r["error"]
        assert r["median_s"] > 0 and r["steps"] == 2 and r["loss"] > 0
    assert by["anima-floor"]["ratio_to_floor"] == 1.0 and by["anima-floor"]["trainable_params"] == 0
    # the tiny Anima DiT's 20 linears are adapted; the forced bypass reached every LoKr module
    lokr = by["anima-lokr:path=bypass"]
    assert lokr["modules"] == 20 and lokr["trainable_params"] > 0 and lokr["fast_path_modules"] == 20
    assert by["ours-lora"]["modules"] > 0 and by["ours-lora"]["fast_path_modules"] == 0  # LoRA has one path
    assert "SUMMARY" in capsys.readouterr().out


def test_train_step_bench_trainer_setup_and_mem_peak_on_cpu():
    """opt=adamw8bit:fp8=1 trains as the trainer does (flat AdamW8bit, fp8 base); --mem_peak needs CUDA."""
    bench = _load("bench_train_step")
    common = ["--tiny", "--device", "cpu", "--dtype", "fp32", "--steps", "1", "--warmup", "1"]
    rows = bench.main([*common, "--variants", "ours-loha:opt=adamw8bit:fp8=1,ours-loha"])
    trainer, plain = rows
    assert "error" not in trainer and "error" not in plain, rows
    assert (trainer["optimizer"], plain["optimizer"]) == ("FlatAdamW8bit", "AdamW")
    assert trainer["trainable_params"] == plain["trainable_params"] > 0
    # the fp8 weights change the forward a little (e4m3 keeps 3 mantissa bits), not the loss's scale
    assert trainer["loss"] != plain["loss"] and abs(trainer["loss"] - plain["loss"]) < 0.1 * plain["loss"]
    with pytest.raises(SystemExit, match="--mem_peak: needs --device cuda"):
        bench.main([*common, "--mem_peak", "--variants", "floor"])


def test_train_step_bench_finds_the_graph_step():
    """graph=1 loads the trainer's CUDA-graph module by path (it failed unnoticed after the module moved)."""
    mod = _load("bench_train_step")._load_cuda_graph_module()
    assert mod.GraphedCall.__name__ == "GraphedCall" and callable(mod.enable_cuda_graph_training)


def test_layer_bench_smoke():
    layers = _load("bench_layers")
    rows = layers.main(["--device", "cpu", "--sizes", "40x24x16", "--iters", "1", "--no_graph"])
    timed = [r for r in rows if "variant" in r]
    names = {r["variant"] for r in timed}
    assert {"base", "lora_r32", "lokr_f-1_full_bypass", "loha_r8_kr", "loha_r32_custom"} <= names
    assert all("error" not in r and r["eager_ms"] > 0 for r in timed)
    model = [r for r in rows if "model_lokr_f-1" in r][0]
    assert set(model["model_loha_r8"]) == {"rebuild", "khatri_rao"}


def test_host_overhead_bench_smoke():
    bench = _load("bench_host_overhead")
    argv = ["--calls", "2", "--repeats", "1", "--warmup", "1", "--modes", "plain", "ckpt"]
    rows = bench.main(argv)
    cases = {(r["layer"], r["base"], r["mode"]) for r in rows}
    assert cases == {
        (k, b, m) for k in ("linear", "conv") for b in ("bf16", "fp8") for m in ("plain", "ckpt")
    }
    by = {(r["layer"], r["base"], r["mode"], r["variant"]): r for r in rows}
    assert {v for *_, v in by} == {"bare", "ours-lora", "ours-loha", "ours-lokr"}
    assert all(r["us_per_call"] > 0 for r in rows)
    assert all(by[(k, b, m, "bare")]["extra_us"] == 0.0 for k, b, m in cases)
    # checkpointing recomputes the same forward: the first call's output and grads are the same bits
    for k, b, _ in cases:
        for v in ("ours-lora", "ours-loha", "ours-lokr"):
            assert by[(k, b, "plain", v)]["digest"] == by[(k, b, "ckpt", v)]["digest"]


def test_host_step_bench_smoke():
    bench = _load("bench_host_step")
    # each variant is a process of its own (imports included): two keep the smoke short
    rows = bench.main(["--tiny", "--variants", "floor,ours-lora", "--rounds", "1", "--steps", "1"])
    by = {r["variant"]: r for r in rows}
    assert list(by) == ["floor", "ours-lora"] and not any("error" in r for r in rows), rows
    assert all(r["median_s"] > 0 and len(r["times_s"]) == 1 for r in rows)
    # the op count is exact: each adapted module adds its own ops to the floor's, forward, recompute, backward
    lora, floor = by["ours-lora"], by["floor"]
    assert floor["trainable_tensors"] == 0 and lora["modules"] > 0
    assert lora["kernel_ops"] >= floor["kernel_ops"] + 3 * lora["modules"]
    assert dict(lora["top_ops"])["addmm_"] >= 2 * lora["modules"]  # the branch into the base output, x2


def test_adapter_bounds_inventory_and_order():
    bench = _load("adapter_bounds")
    out = bench.main(["--json"])
    shapes = {(r["out"], r["in"], r["tokens"]): r["layers"] for r in out["shapes"]}
    # SDXL batch 4 at 1024²: 722 adapted Linear layers; the 1280-wide blocks see 32² latents, text k/v 77 tokens
    assert out["layers"] == 722 == sum(shapes.values())
    assert shapes[(1280, 1280, 4096)] == 372 and shapes[(640, 640, 16384)] == 70
    assert shapes[(1280, 2048, 4 * 77)] == 120
    r = out["ratio_to_floor"]
    for algo in ("lora", "lokr", "loha"):
        assert 1.0 < r[algo + "_bound"] <= r[algo], (algo, r)


def test_path_bench_smoke():
    bench = _load("bench_paths")
    rows = bench.main(["--device", "cpu", "--model", "tiny", "--rank", "4", "--iters", "1", "--repeats", "1"])
    timed = [r for r in rows if "variant" in r]
    assert [r["variant"] for r in timed[:6]] == [
        "base",
        "lora",
        "lokr_rebuild",
        "lokr_bypass",
        "loha_rebuild",
        "loha_khatri_rao",
    ]
    assert all("error" not in r and r["eager_us"] > 0 for r in timed)
    assert all(r["model_eager"] in ("rebuild", "bypass", "khatri_rao") for r in timed if "model_eager" in r)
    # one pick per shape and algorithm in eager (no graph timing on the CPU), and a step total per algorithm
    picks = [r for r in rows if "shape" in r]
    assert len(picks) == 2 * len(bench.SHAPES["tiny"]) and {r["mode"] for r in picks} == {"eager"}
    totals = [r for r in rows if "step_extra_ms" in r]
    assert {(r["algo"], r["mode"]) for r in totals} == {("lokr", "eager"), ("loha", "eager")}
    assert all(r["step_extra_ms"]["best"] <= r["step_extra_ms"]["model"] for r in totals)


def test_fp8_fused_bench_smoke():
    bench = _load("bench_fp8_fused")
    rows = bench.main(
        ["--device", "cpu", "--shapes", "tiny", "--rank", "4", "--iters", "1", "--repeats", "1"]
    )
    timed = [r for r in rows if "path" in r]
    # per fp8 kind: the bare layer, then each algo on the old path and on the fused node
    assert len(timed) == 2 * (1 + 3 * 2)
    assert all("error" not in r and r["eager_ms"] > 0 for r in timed)
    assert {r["forward_path"] for r in timed if r["path"] == "fused"} == {"fused_node"}
    summary = [r for r in rows if "summary" in r]
    assert {(r["fp8"], r["algo"]) for r in summary} == {
        (k, a) for k in ("plain", "scaled") for a in ("lora", "lokr", "loha")
    }


def test_anima_fp8_bench_smoke(tmp_path):
    bench = _load("bench_anima_fp8")
    res = bench.main(["--smoke", "--algos", "lokr", "--out", str(tmp_path)])
    assert {p.name for p in tmp_path.iterdir()} == {"fp8_errors.json", "fp8_memory.json", "fp8_curve.json"}
    errs = res["errors"]["summary"]
    assert set(errs) == {"init", "row_spread"}
    assert all(
        0 < e["per_channel"]["mean"] < 0.05 and e["bf16_vs_fp32"]["mean"] < 0.01 for e in errs.values()
    )
    runs = res["memory"]["runs"]
    # 3 precisions × block swap on/off × cached/live text encoder
    assert len(runs) == 12 and all("error" not in r and r["trainable_params"] > 0 for r in runs), runs
    curve = res["curve"]["summary"]
    assert set(curve) == {"bf16", "fp8", "fp8_scaled"} and all(c["finite"] for c in curve.values())
    assert curve["bf16"]["max_abs_diff_vs_bf16"] == 0
    # fp8 changes the numbers a little, not the course: well under 10 % of the loss
    for name in ("fp8", "fp8_scaled"):
        assert 0 < curve[name]["max_abs_diff_vs_bf16"] < 0.1 * curve["bf16"]["mean_loss"], curve


def test_comfy_interop_bad_checkout_is_one_line(tmp_path, capsys):
    """The ComfyUI run needs a checkout (not in CI); a folder without ComfyUI's loader is one error line."""
    bench = _load("comfy_interop")
    assert bench.run_tool(bench.PROG, bench.main, ["--comfy_path", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"comfy_interop.py: error: --comfy_path {tmp_path}: no comfy/lora.py and comfy/weight_adapter/ "
        "(expected a ComfyUI checkout)"
    ]


def test_loha_delta_bench_smoke_under_the_interpreter():
    from tests.helpers.triton_interpreter import run_json

    row = run_json(*INTERPRETER_CASES)
    assert row["shape"] == "smoke_77x130"
    # both paths against fp64 at bf16: the kernel rounds once, torch's path up to three times
    assert row["err_build_kernel"] <= 2.0**-8
    assert row["err_build_kernel"] < row["err_build_torch"] <= 3 * 2.0**-8
    assert row["err_grads_kernel"] <= row["err_grads_torch"]


def test_flat_8bit_bench_smoke():
    bench = _load("bench_flat_8bit")
    args = ["--device", "cpu", "--rank", "1", "--min_8bit_size", "256", "--tensors", "40", "--steps", "1"]
    row = bench.run(bench._parse(args))
    assert len(bench.loha_shapes(32)) == 2888  # 722 adapted Linears of the SDXL U-Net, four factors each
    assert row["tensors"] == 40 and row["flat_launches"] == 1 and row["bitwise_equal"] is True, row
    assert row["per_tensor_wall_ms"] > 0 and row["flat_wall_ms"] > 0
    lokr = ["--device", "cpu", "--network", "lokr", "--tensors", "80", "--steps", "1"]
    assert len(bench.lokr_shapes(32)) == 1574  # 592 full-W2 modules × 2 tensors + 130 low-rank × 3
    row = bench.run(bench._parse(lokr))  # a mix of 8-bit and (under min_8bit_size) 32-bit states
    assert 0 < row["tensors_32bit"] < 80 and row["flat_launches"] == 2 and row["bitwise_equal"] is True, row
