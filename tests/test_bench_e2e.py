"""CPU smoke of the end-to-end CLI benchmark: tiny models, our SDXL trainer, 3 steps, then the JSON."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_e2e", ROOT / "bench" / "bench_e2e.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_e2e"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_e2e_bench_tiny_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    bench = _load_bench()
    out = tmp_path / "e2e"
    # a stand-in "sd-scripts" whose trainer fails after printing: the bench records it and goes on
    fake = tmp_path / "fake-sd-scripts"
    fake.mkdir()
    (fake / "sdxl_train_network.py").write_text("import sys\nprint('loading...')\nsys.exit('boom: no GPU')\n")
    argv = ["--scale", "tiny", "--out", str(out), "--models", "sdxl", "--algos", "lokr", "--batches", "2",
            "--cache", "on", "--modes", "eager,graph", "--impl", "sd-scripts,ours", "--steps", "4",
            "--warmup", "1", "--profile_step", "2", "--sample_every", "3", "--images", "8", "--shapes", "2", "--sd_scripts_path", str(fake),
            "--torchvision_shim", "off"]  # fmt: skip
    rows = bench.main(argv)
    lines = [json.loads(x) for x in (out / "e2e.jsonl").read_text().splitlines()]
    ran = [r for r in lines if "skipped" not in r]
    assert [r["run"] for r in ran] == [
        "sdxl-lokr-b2-cached-sd-scripts-eager",
        "sdxl-lokr-b2-cached-ours-eager",
    ]
    assert ran == [r for r in rows if "skipped" not in r]
    failed, r = ran
    assert not failed["ok"] and failed["error"] == "exit code 1" and failed["steps_done"] == 0
    assert "boom: no GPU" in failed["error_tail"] and "loading..." in failed["error_tail"]
    # the same command line for both implementations, bar the run's own output folder
    assert failed["cwd"] == str(fake) and failed["command"].replace(failed["run"], r["run"]) == r["command"]
    assert r["ok"], r.get("error_tail")
    assert r["run"] == "sdxl-lokr-b2-cached-ours-eager" and r["device"] == "cpu"
    # the hook saw every optimizer step, each with the loss the trainer backpropagated
    assert r["steps_done"] == 4 and len(r["losses"]) == 4
    assert all(math.isfinite(x) and x > 0 for x in r["losses"])
    # step 3 was profiled: its interval is left out of the steady s/it (profiler overhead)
    prof = r["profile"]
    assert prof["step"] == 3 and prof["activity"] == "cpu" and 0 < prof["busy_s"]
    assert math.isclose(sum(prof["groups_s"].values()), prof["busy_s"], rel_tol=1e-3, abs_tol=1e-3)
    assert prof["top"] and prof["top"][0]["calls"] >= 1
    assert prof["launches"] == sum(prof["groups_launches"].values()) >= sum(t["calls"] for t in prof["top"])
    assert set(prof["groups_launches"]) == set(prof["groups_s"])
    assert len(r["step_times_s"]) == 3 and r["steady_steps"] == 2
    rest = [r["step_times_s"][0], r["step_times_s"][2]]
    assert abs(r["steady_s_per_it"] - sum(rest) / 2) < 1e-4  # the median of two
    assert 0 < r["time_to_first_step_s"] < r["wall_s"]
    assert r["host_peak_rss_mib"] > 100  # a Python process with torch loaded is far above 100 MiB
    assert "gpu_peak_allocated_mib" not in r  # no CUDA: memory is the host's
    assert r["torch"] == torch.__version__ and r["cuda"] == torch.version.cuda  # the child's own versions
    # when the host memory peaked (sampled 4× a second), on the run's own clock
    assert 0 < r["host_rss_peak_at_s"] <= r["wall_s"] and "gpu_alloc_peak_at_s" not in r
    assert "--network_module networks.lokr --network_dim 32 --network_alpha 16" in r["command"]
    assert "--cache_latents --cache_text_encoder_outputs" in r["command"] and "adamw8bit" not in r["command"]
    assert "AdamW" in r["dropped_flags"]
    # the run wrote its network; graph mode was left out for want of CUDA, and says so
    assert (Path(r["cwd"]) == ROOT) and (out / "runs" / r["run"] / "net.safetensors").is_file()
    skipped = {x["run"]: x["skipped"] for x in lines if "skipped" in x}
    assert skipped == {"sdxl-lokr-b2-cached-sd-scripts-graph": "sd-scripts has one step mode (eager)",
                       "sdxl-lokr-b2-cached-ours-graph": "--cuda_graph needs CUDA"}  # fmt: skip
    summary = (out / "e2e_summary.md").read_text()
    assert f"| {r['run']} | {r['time_to_first_step_s']} | {r['host_rss_peak_at_s']} | — |" in summary
    assert "sdxl-lokr-b2-cached-ours-eager | yes, 1/1 samples" in summary
    # the sample prompt ran through the trainer's sampler: one image, at the prompt's size
    assert r["samples"] == r["samples_expected"] == 1 and "--sample_every_n_steps 3" in r["command"]
    (png,) = (out / "runs" / r["run"] / "sample").glob("*.png")
    assert Image.open(png).size == (64, 64)
    assert "| sdxl-lokr-b2-cached-ours-eager (step 3, cpu) |" in summary


def test_e2e_log_parsing_and_eager_comparison(tmp_path):
    bench = _load_bench()
    log = tmp_path / "run.log"
    log.write_text(
        "INFO step mode: graph (default on CUDA; --no_cuda_graph turns it off)\n"
        "INFO cuda graph: captured shape 1x4x128x128 in 3.25 s, reserved +1.50 GiB (now 9.75 GiB), "
        "allocated peak 8.12 GiB\n"
        "steps: 10%\n"
        "INFO cuda graph: captured shape 1x4x112x144 in 0.90 s, reserved -0.25 GiB (now 9.75 GiB), "
        "allocated peak 8.01 GiB (entered with 6.50 GiB allocated, peak before 8.01 GiB)\n"
    )
    got = bench.parse_log(log)
    assert got["step_mode"] == "graph (default on CUDA; --no_cuda_graph turns it off)"
    assert got["captures"] == [
        {"shape": "1x4x128x128", "capture_s": 3.25, "reserved_delta_gib": 1.5, "reserved_gib": 9.75,
         "peak_allocated_gib": 8.12},
        {"shape": "1x4x112x144", "capture_s": 0.9, "reserved_delta_gib": -0.25, "reserved_gib": 9.75,
         "peak_allocated_gib": 8.01, "entry_allocated_gib": 6.5, "peak_before_gib": 8.01},
    ]  # fmt: skip
    table = bench.capture_table([{"run": "r", **got}])
    assert "| r | 1x4x128x128 | 3.25 | +1.50 | 9.75 | 8.12 | — |" in table
    assert "| r | 1x4x112x144 | 0.90 | -0.25 | 9.75 | 8.01 | 6.50 / 8.01 |" in table
    assert bench.parse_log(tmp_path / "missing.log") == {}
    # a None loss (a step the hook saw without a backward) is left out of the comparison
    gap = bench.loss_gap([0.5, 0.25, None, 0.1], [0.5, 0.2, 0.3, 0.125])
    assert gap["steps"] == 3 and math.isclose(gap["max_abs"], 0.05) and math.isclose(gap["max_rel"], 0.25)
    assert math.isclose(gap["mean_abs"], (0 + 0.05 + 0.025) / 3)
    base = {
        "run": "e",
        "ok": True,
        "losses": [0.5, 0.2],
        "gpu_peak_allocated_mib": 1000.0,
        "host_peak_rss_mib": 1,
    }
    rows = [
        {**base, "model": "sdxl", "algo": "loha", "batch": 1, "cache": True, "impl": "ours", "mode": "eager"},
        {**base, "run": "g", "model": "sdxl", "algo": "loha", "batch": 1, "cache": True, "impl": "ours",
         "mode": "default", "losses": [0.5, 0.21], "gpu_peak_allocated_mib": 1300.0, "step_mode": "graph (x)"},
    ]  # fmt: skip
    text = bench.markdown_summary(rows)
    assert "| g | graph (x) | 2 | 1.00e-02 | 5.00e-03 | 5.00e-02 | +300 |" in text


def test_memory_sampler_survives_a_torch_still_importing(monkeypatch):
    # the sampler's thread starts before the trainer imports torch; mid-import, sys.modules already holds a
    # torch module without its `cuda` attribute (the session-13 GPU run lost its sampler thread that way)
    import types

    spec = importlib.util.spec_from_file_location("e2e_child_t", ROOT / "bench" / "e2e_child.py")
    child = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(child)
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
    sampler = child.MemorySampler(t0=0.0)
    sampler.sample()
    assert sampler.rss[0] > 0 and sampler.gpu == (0.0, None)
