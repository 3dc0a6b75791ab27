"""End-to-end CLI benchmark: our trainers and sd-scripts' on the same files with the same command line.

Writes random-init models in the released layouts (SDXL single-file fp16 checkpoint; Anima `net.` DiT,
Qwen3-0.6B folder, VAE), a bucketed dataset with captions and its TOML, then runs each trainer as a
subprocess with the seed's flags:

    --mixed_precision bf16 --fp8_base --optimizer_type adamw8bit --gradient_checkpointing
    --network_module networks.loha|lokr --network_dim 32 --network_alpha 16

and per run records: steady s/it (median step interval after --warmup steps, CUDA-synchronised),
time from launch to the end of the first step, peak GPU memory (allocated, reserved), peak host RSS,
the loss of every step, and the exact command. A failing run is recorded with its error tail.
Output: `--out DIR` gets e2e.jsonl (one line per run), e2e_summary.md and one log per run.

GPU (the lead's run; sd-scripts checkout in baselines/sd-scripts, its pinned packages in a site folder):
    python bench/bench_e2e.py --scale real --out /tmp/e2e --sd_scripts_path baselines/sd-scripts \
        --sd_pythonpath /tmp/site_sd --models sdxl --algos loha,lokr --batches 4 --cache on \
        --modes eager,graph --impl ours,sd-scripts --steps 16
CPU smoke (no CUDA: fp8, bf16 and adamw8bit are dropped, AdamW in fp32, and the output says so):
    python bench/bench_e2e.py --scale tiny --out /tmp/e2e_tiny --models sdxl --algos loha --steps 3
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
SCRIPTS = {"sdxl": "sdxl_train_network.py", "anima": "anima_train_network.py"}
SEED_FLAGS = ["--mixed_precision", "bf16", "--fp8_base", "--optimizer_type", "adamw8bit"]
CPU_FLAGS = ["--optimizer_type", "AdamW"]  # what stands in for SEED_FLAGS where there is no CUDA
OUR_MODE_FLAGS = {
    "eager": ["--no_cuda_graph"],
    "graph": ["--cuda_graph"],
    "default": [],
    "compile": ["--cuda_graph", "--torch_compile"],  # the graph step plus regional torch.compile
}  # our step-mode flags
CPU_DROPPED = (
    "--mixed_precision bf16 --fp8_base --optimizer_type adamw8bit -> --optimizer_type AdamW (no CUDA)"
)


@dataclass(frozen=True)
class RunSpec:
    model: str  # sdxl | anima
    algo: str  # loha | lokr
    batch: int
    cache: bool
    mode: str  # eager | graph | default
    impl: str  # ours | sd-scripts
    tag: str = ""  # names a variant of the same command (e.g. an env switch), so runs side by side differ

    @property
    def name(self) -> str:
        cache = "cached" if self.cache else "uncached"
        tag = f"-{self.tag}" if self.tag else ""
        return f"{self.model}-{self.algo}-b{self.batch}-{cache}-{self.impl}-{self.mode}{tag}"


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for models, dataset, logs and results")
    p.add_argument("--scale", choices=["real", "tiny"], default="real")
    p.add_argument("--models", default="sdxl,anima")
    p.add_argument("--algos", default="loha,lokr")
    p.add_argument("--batches", default="1,4", help="SDXL batch sizes")
    p.add_argument("--anima_batches", default="2", help="Anima batch sizes")
    p.add_argument("--cache", choices=["both", "on", "off"], default="both",
                   help="--cache_latents --cache_text_encoder_outputs on, off or both")  # fmt: skip
    p.add_argument("--modes", default="eager,graph",
                   help="eager (ours: --no_cuda_graph), graph (--cuda_graph; ours on CUDA only), default (no step-mode flag)")  # fmt: skip
    p.add_argument("--impl", default="ours,sd-scripts", help="ours, sd-scripts")
    p.add_argument("--steps", type=int, default=16, help="--max_train_steps of every run")
    p.add_argument("--warmup", type=int, default=4, help="first steps left out of the steady s/it")
    p.add_argument("--profile_step", type=int, default=0,
                   help="profile the step after this one in every run (torch.profiler; 0: none)")  # fmt: skip
    p.add_argument("--sample_every", type=int, default=0,
                   help="--sample_every_n_steps of every run, with one prompt at the dataset's resolution (0: none)")  # fmt: skip
    p.add_argument("--tag", default="",
                   help="suffix of every run name: tells variants of one command apart (e.g. an env switch)")  # fmt: skip
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--dataset_scale", choices=["real", "tiny"], default=None,
                   help="image sizes (default: --scale); tiny images let real models run on a CPU")  # fmt: skip
    p.add_argument("--shapes", type=int, default=4, help="bucket shapes the images are dealt over (max 8)")
    p.add_argument("--sd_scripts_path", default=None, help="checkout of kohya-ss/sd-scripts (never vendored)")
    p.add_argument("--sd_pythonpath", default=None,
                   help="folder put first on PYTHONPATH for sd-scripts runs (its pinned transformers etc.)")  # fmt: skip
    p.add_argument("--torchvision_shim", choices=["auto", "on", "off"], default="auto",
                   help="sd-scripts imports torchvision; 'auto' uses bench/e2e_shim only where it cannot load")  # fmt: skip
    p.add_argument("--run_timeout", type=float, default=420.0, help="seconds per trainer run")
    p.add_argument(
        "--budget_s",
        type=float,
        default=None,
        help="stop starting runs this many seconds after the first began",
    )
    p.add_argument("--min_run_s", type=float, default=45.0, help="no run starts with less budget than this")
    p.add_argument("--workers", type=int, default=0, help="--max_data_loader_n_workers")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="where models are built")
    p.add_argument("--write", default=None, help=argparse.SUPPRESS)  # internal: write one model's files
    opts = p.parse_args(argv)
    opts.dataset_scale = opts.dataset_scale or opts.scale
    if not 1 <= opts.shapes <= 8:
        p.error(f"--shapes {opts.shapes}: expected 1 to 8")
    return opts


def plan_runs(opts: argparse.Namespace, cuda: bool) -> tuple[list[RunSpec], list[dict]]:
    """The run matrix in order, and the combinations left out with the reason."""
    caches = {"both": [True, False], "on": [True], "off": [False]}[opts.cache]
    runs, skipped = [], []
    for model in _csv(opts.models):
        if model not in SCRIPTS:
            raise SystemExit(f"--models: unknown model {model!r} (expected sdxl, anima)")
        batches = [int(b) for b in _csv(opts.anima_batches if model == "anima" else opts.batches)]
        for algo, batch, cache in itertools.product(_csv(opts.algos), batches, caches):
            for impl, mode in itertools.product(_csv(opts.impl), _csv(opts.modes)):
                spec = RunSpec(model, algo, batch, cache, mode, impl, opts.tag)
                why = None
                if mode not in OUR_MODE_FLAGS:
                    raise SystemExit(f"--modes: unknown mode {mode!r} (expected {', '.join(OUR_MODE_FLAGS)})")
                if impl == "sd-scripts" and mode != "eager":
                    why = "sd-scripts has one step mode (eager)"
                elif mode == "graph" and not cuda:
                    why = "--cuda_graph needs CUDA"
                elif impl == "sd-scripts" and not opts.sd_scripts_path:
                    why = "no --sd_scripts_path"
                if why:
                    skipped.append({"run": spec.name, "skipped": why})
                else:
                    runs.append(spec)
    return runs, skipped


def trainer_argv(spec: RunSpec, files: dict, toml_path: Path, out_dir: Path, opts, cuda: bool) -> list[str]:
    """The command line after the script name: identical for ours and sd-scripts' (bar the step-mode flag:
    our graph runs pass --cuda_graph, our eager runs on CUDA --no_cuda_graph since the graph is the default)."""
    argv = ["--dataset_config", str(toml_path)]
    if spec.model == "sdxl":
        argv += ["--pretrained_model_name_or_path", str(files["ckpt"]),
                 "--tokenizer_cache_dir", str(files["tokenizers"])]  # fmt: skip
    else:
        argv += ["--pretrained_model_name_or_path", str(files["dit"]), "--qwen3", str(files["text_encoder"]),
                 "--vae", str(files["vae"]), "--t5_tokenizer_path", str(files["t5_tokenizer"])]  # fmt: skip
    argv += [
        "--network_module", f"networks.{spec.algo}", "--network_dim", "32", "--network_alpha", "16",
        *(SEED_FLAGS if cuda else CPU_FLAGS), "--gradient_checkpointing", "--sdpa",
        "--network_train_unet_only", "--learning_rate", "1e-4",
        "--train_batch_size", str(spec.batch), "--max_train_steps", str(opts.steps),
        "--max_data_loader_n_workers", str(opts.workers), "--seed", "42",
        "--output_dir", str(out_dir), "--output_name", "net", "--save_model_as", "safetensors",
    ]  # fmt: skip
    if spec.cache:
        argv += ["--cache_latents", "--cache_text_encoder_outputs"]
    if opts.sample_every:
        argv += ["--sample_prompts", str(Path(opts.out).resolve() / f"prompts_{opts.dataset_scale}.txt"),
                 "--sample_every_n_steps", str(opts.sample_every), "--sample_sampler", "euler_a"]  # fmt: skip
    if spec.impl == "ours" and cuda:  # on a CPU every mode is eager, and the command stays sd-scripts'
        argv += OUR_MODE_FLAGS[spec.mode]
    return argv


def write_prompts(path: Path, scale: str) -> None:
    """One sample prompt in the prompt-file syntax both trainers read (size, steps, seed, CFG, negative)."""
    size, steps = (1024, 20) if scale == "real" else (64, 2)
    line = f"a red fox in a snowy forest, best quality --n lowres --w {size} --h {size} --s {steps} --d 7 --l 5.0\n"
    path.write_text(line, encoding="utf-8")


def summarise_steps(rows: list[dict], warmup: int) -> dict:
    """Timing and losses from the hook's lines (see bench/e2e_child.py)."""
    steps = [r for r in rows if "step" in r and not r.get("profile")]
    final = next((r for r in rows if r.get("final")), {})
    profiled = next((r for r in rows if r.get("profile")), None)
    out: dict = {"steps_done": len(steps), "losses": [r["loss"] for r in steps]}
    if profiled:
        out["profile"] = profiled
    if steps:
        out["time_to_first_step_s"] = round(steps[0]["t"], 3)
        intervals = [b["t"] - a["t"] for a, b in zip(steps, steps[1:])]
        out["step_times_s"] = [round(x, 4) for x in intervals]
        # interval i ends step i+2: skip the first `warmup` steps, and the profiled one (profiler overhead)
        steady = [
            x
            for i, x in enumerate(intervals)
            if i >= warmup - 1 and not (profiled and i + 2 == profiled["step"])
        ]
        if steady:
            out["steady_s_per_it"] = round(statistics.median(steady), 4)
            out["steady_mean_s_per_it"] = round(statistics.fmean(steady), 4)
            out["steady_steps"] = len(steady)
    for key in ("gpu_peak_allocated_mib", "gpu_peak_reserved_mib", "gpu_name", "torch", "cuda",
                "host_rss_peak_at_s", "gpu_alloc_peak_at_s"):  # fmt: skip
        if key in final:
            out[key] = round(final[key], 1) if isinstance(final[key], float) else final[key]
    return out


def _wait(proc: subprocess.Popen, timeout: float) -> tuple[int | None, float]:
    """Wait for the child with wait4 (its own peak RSS, even when it fails); kill its group on timeout."""
    deadline = time.time() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_maxrss / 1024
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            return None, usage.ru_maxrss / 1024
        time.sleep(0.1)


CAPTURE_RE = re.compile(
    r"cuda graph: captured shape (?P<shape>.+?) in (?P<s>[\d.]+) s, reserved (?P<dres>[+-][\d.]+) GiB "
    r"\(now (?P<res>[\d.]+) GiB\), allocated peak (?P<peak>[\d.]+) GiB"
    r"(?: \(entered with (?P<entry>[\d.]+) GiB allocated, peak before (?P<before>[\d.]+) GiB\))?"
)


def parse_log(path: Path) -> dict:
    """What our trainer's log says about its step mode and each CUDA-graph capture (none for sd-scripts)."""
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    out: dict = {}
    mode = re.search(r"step mode: (.+)", text)
    if mode:
        out["step_mode"] = mode.group(1).strip()
    caps = [
        {
            "shape": m["shape"],
            "capture_s": float(m["s"]),
            "reserved_delta_gib": float(m["dres"]),
            "reserved_gib": float(m["res"]),
            "peak_allocated_gib": float(m["peak"]),
            **(
                {"entry_allocated_gib": float(m["entry"]), "peak_before_gib": float(m["before"])}
                if m["entry"]
                else {}
            ),
        }  # fmt: skip
        for m in CAPTURE_RE.finditer(text)
    ]
    if caps:
        out["captures"] = caps
    return out


def _tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def launch(cmd: list[str], cwd: Path, env: dict, log: Path, hook: Path, timeout: float) -> dict:
    """Run one child with the step hook; returns rc, timing rows, peak RSS and wall time."""
    hook.unlink(missing_ok=True)
    env = {**env, "E2E_HOOK_OUT": str(hook), "E2E_T0": repr(time.time()), "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        rc, rss = _wait(proc, timeout)
    rows = [json.loads(x) for x in hook.read_text().splitlines()] if hook.exists() else []
    return {"rc": rc, "rows": rows, "host_peak_rss_mib": round(rss, 1), "wall_s": round(time.time() - t0, 2)}


def child_env(spec: RunSpec, opts: argparse.Namespace, shim: bool) -> dict:
    env = dict(os.environ)
    if opts.profile_step:
        env["E2E_PROFILE_STEP"] = str(opts.profile_step)
    if spec.impl == "sd-scripts":
        extra = [str(Path(opts.sd_pythonpath).resolve())] if opts.sd_pythonpath else []
        env["PYTHONPATH"] = os.pathsep.join(extra + [p for p in [env.get("PYTHONPATH")] if p])
        if shim:
            env["E2E_TORCHVISION_SHIM"] = str(BENCH_DIR / "e2e_shim")
    return env


def run_one(
    spec: RunSpec, files: dict, toml_path: Path, opts, cuda: bool, shim: bool, timeout: float
) -> dict:
    out = Path(opts.out).resolve()
    run_dir = out / "runs" / spec.name
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(run_dir / "sample", ignore_errors=True)  # an earlier invocation's samples do not count
    root = REPO_ROOT if spec.impl == "ours" else Path(opts.sd_scripts_path).resolve()
    script = root / SCRIPTS[spec.model]
    argv = trainer_argv(spec, files, toml_path, run_dir, opts, cuda)
    log = out / "logs" / f"{spec.name}.log"
    log.parent.mkdir(exist_ok=True)
    env = child_env(spec, opts, shim)
    res = launch([sys.executable, str(BENCH_DIR / "e2e_child.py"), str(script), *argv], root, env, log,
                 run_dir / "steps.jsonl", timeout)  # fmt: skip
    row = {"run": spec.name, **asdict(spec), "scale": opts.scale, "device": "cuda" if cuda else "cpu",
           "command": f"python {SCRIPTS[spec.model]} " + " ".join(argv), "cwd": str(root), "rc": res["rc"],
           "wall_s": res["wall_s"], "host_peak_rss_mib": res["host_peak_rss_mib"],
           **summarise_steps(res["rows"], opts.warmup), **parse_log(log), "log": str(log)}  # fmt: skip
    if opts.sample_every:  # both trainers write their samples to <output_dir>/sample
        row["samples"] = len(list((run_dir / "sample").glob("*.png")))
        row["samples_expected"] = opts.steps // opts.sample_every
    if not cuda:
        row["dropped_flags"] = CPU_DROPPED
    if spec.impl == "sd-scripts" and shim:
        row["torchvision"] = "bench/e2e_shim stand-in (torchvision cannot load here)"
    row["ok"] = res["rc"] == 0 and row["steps_done"] == opts.steps
    if not row["ok"]:
        row["error"] = "timed out" if res["rc"] is None else f"exit code {res['rc']}"
        row["error_tail"] = _tail(log)
    return row


def _torchvision_loads() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    probe = subprocess.run([sys.executable, "-c", "import torchvision.transforms"], capture_output=True)
    return probe.returncode == 0


def write_models(model: str, opts: argparse.Namespace, device: str) -> dict:
    """Model files in a child process (its memory is returned to the system before any run starts)."""
    folder = Path(opts.out).resolve() / f"models_{model}_{opts.scale}"
    manifest = folder / "files.json"
    if not manifest.exists():
        cmd = [sys.executable, str(Path(__file__).resolve()), "--out", opts.out, "--scale", opts.scale,
               "--device", device, "--write", model]  # fmt: skip
        t0 = time.time()
        subprocess.run(cmd, check=True, cwd=REPO_ROOT)
        print(f"[e2e] wrote {model} ({opts.scale}) in {time.time() - t0:.1f} s", flush=True)
    return {k: Path(v) for k, v in json.loads(manifest.read_text()).items()}


def _import_setup():
    for path in (str(REPO_ROOT), str(BENCH_DIR)):
        if path not in sys.path:
            sys.path.insert(0, path)
    import e2e_setup

    return e2e_setup


def _write_child(model: str, opts: argparse.Namespace) -> None:
    e2e_setup = _import_setup()

    folder = Path(opts.out).resolve() / f"models_{model}_{opts.scale}"
    writer = e2e_setup.write_sdxl if model == "sdxl" else e2e_setup.write_anima
    files = writer(folder, opts.scale, opts.device)
    (folder / "files.json").write_text(json.dumps({k: str(v) for k, v in files.items()}))


def markdown_summary(rows: list[dict]) -> str:
    """One table row per run, and ours / sd-scripts ratios of runs that differ only in implementation."""
    head = ("| run | ok | steady s/it | first step s | GPU peak alloc / reserved MiB | host peak RSS MiB "
            "| loss first → last |\n|---|---|---|---|---|---|---|\n")  # fmt: skip
    lines = []
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['run']} | skipped: {r['skipped']} | | | | | |")
            continue
        gpu = f"{r.get('gpu_peak_allocated_mib', '—')} / {r.get('gpu_peak_reserved_mib', '—')}"
        losses = [x for x in r.get("losses", []) if x is not None]
        loss = f"{losses[0]:.4f} → {losses[-1]:.4f}" if losses else "—"
        ok = "yes" if r["ok"] else f"no ({r.get('error')})"
        if "samples" in r:
            ok += f", {r['samples']}/{r['samples_expected']} samples"
        lines.append(f"| {r['run']} | {ok} | {r.get('steady_s_per_it', '—')} | "
                     f"{r.get('time_to_first_step_s', '—')} | {gpu} | {r['host_peak_rss_mib']} | {loss} |")  # fmt: skip
    text = head + "\n".join(lines) + "\n"
    ratios = []
    by_key = {(r["model"], r["algo"], r["batch"], r["cache"], r["impl"], r["mode"], r.get("tag", "")): r
              for r in rows if r.get("ok")}  # fmt: skip
    for key, r in by_key.items():
        base = _baseline(by_key, key, "sd-scripts")
        if key[4] == "ours" and base and "steady_s_per_it" in r and "steady_s_per_it" in base:
            ratios.append(f"| {r['run']} | {r['steady_s_per_it'] / base['steady_s_per_it']:.2f} | "
                          f"{r['time_to_first_step_s'] / base['time_to_first_step_s']:.2f} |")  # fmt: skip
    if ratios:
        text += ("\n| ours vs sd-scripts eager (same command) | s/it ratio | first-step ratio |\n"
                 "|---|---|---|\n" + "\n".join(ratios) + "\n")  # fmt: skip
    return text + compare_to_eager(by_key) + capture_table(rows) + profile_table(rows) + peak_time_table(rows)


def peak_time_table(rows: list[dict]) -> str:
    """When each run's memory peaked (sampled), against its first step: loading/caching or the steps."""
    timed = [r for r in rows if r.get("host_rss_peak_at_s") is not None]
    if not timed:
        return ""
    lines = ["\n| run | first step s | host RSS peak at s | GPU allocated peak at s |", "|---|---|---|---|"]
    for r in timed:
        lines.append(f"| {r['run']} | {r.get('time_to_first_step_s', '—')} | {r['host_rss_peak_at_s']} | "
                     f"{r.get('gpu_alloc_peak_at_s', '—')} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def profile_table(rows: list[dict]) -> str:
    """Where the profiled step's time went: kernel time against wall time, and the time per kernel group."""
    prof = [(r["run"], r["profile"]) for r in rows if r.get("profile")]
    if not prof:
        return ""
    lines = ["\n| profiled step | wall s | kernels s (fraction) | launches | by group (s / launches) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for run, p in prof:
        n = p.get("groups_launches", {})  # rows from before the launch counts have none
        groups = ", ".join(f"{g} {t}" + (f" / {n[g]}" if g in n else "") for g, t in p["groups_s"].items())
        lines.append(f"| {run} (step {p['step']}, {p['activity']}) | {p['wall_s']} | {p['busy_s']} "
                     f"({p['busy_fraction']}) | {p.get('launches', '')} | {groups} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def loss_gap(a: list, b: list) -> dict:
    """Per-step loss difference of two runs over the steps both finished."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if not pairs:
        return {}
    diffs = [abs(x - y) for x, y in pairs]
    rel = [d / max(abs(y), 1e-12) for d, (_, y) in zip(diffs, pairs)]
    return {
        "steps": len(pairs),
        "max_abs": max(diffs),
        "mean_abs": statistics.fmean(diffs),
        "max_rel": max(rel),
    }


def _baseline(by_key: dict, key: tuple, impl: str) -> dict | None:
    """The eager run of `impl` with the same command as `key`: of the same tag, else the untagged one."""
    model, algo, batch, cache, _impl, _mode, tag = key
    same = (model, algo, batch, cache, impl, "eager")
    return by_key.get((*same, tag)) or by_key.get((*same, ""))


def compare_to_eager(by_key: dict) -> str:
    """Each of our non-eager runs against our eager run of the same command: losses and peak memory."""
    lines = []
    for (model, algo, batch, cache, impl, mode, tag), r in by_key.items():
        base = _baseline(by_key, (model, algo, batch, cache, impl, mode, tag), impl)
        if impl != "ours" or mode == "eager" or not base:
            continue
        gap = loss_gap(r.get("losses", []), base.get("losses", []))
        mem = r.get("gpu_peak_allocated_mib", 0) - base.get("gpu_peak_allocated_mib", 0)
        if gap:
            lines.append(f"| {r['run']} | {r.get('step_mode', '—')} | {gap['steps']} | {gap['max_abs']:.2e} | "
                         f"{gap['mean_abs']:.2e} | {gap['max_rel']:.2e} | {mem:+.0f} |")  # fmt: skip
    if not lines:
        return ""
    return ("\n| ours vs ours eager | step mode | steps | max abs Δloss | mean abs Δloss | max rel Δloss "
            "| Δ peak alloc MiB |\n|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n")  # fmt: skip


def capture_table(rows: list[dict]) -> str:
    """Capture time and memory per bucket shape, from our trainer's log."""

    def entered(c: dict) -> str:  # logs before session 11 do not say what the capture entered with
        return (
            f"{c['entry_allocated_gib']:.2f} / {c['peak_before_gib']:.2f}"
            if "entry_allocated_gib" in c
            else "—"
        )

    lines = [f"| {r['run']} | {c['shape']} | {c['capture_s']:.2f} | {c['reserved_delta_gib']:+.2f} | "
             f"{c['reserved_gib']:.2f} | {c['peak_allocated_gib']:.2f} | {entered(c)} |"
             for r in rows for c in r.get("captures", [])]  # fmt: skip
    if not lines:
        return ""
    return (
        "\n| run | captured shape | capture s | reserved Δ GiB | reserved GiB | peak alloc GiB "
        "| allocated / peak on entry GiB |\n|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n"
    )


def all_runs(jsonl: Path) -> list[dict]:
    """Every run in e2e.jsonl, the latest line of each run name, in first-seen order."""
    latest: dict[str, dict] = {}
    for line in jsonl.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        latest[row["run"]] = row  # a dict keeps the first position of a key and the last value
    return list(latest.values())


def main(argv: list[str] | None = None) -> list[dict]:
    opts = parse_args(argv)
    if opts.write:
        _write_child(opts.write, opts)
        return []
    import torch

    cuda = torch.cuda.is_available()
    device = ("cuda" if cuda else "cpu") if opts.device == "auto" else opts.device
    runs, skipped = plan_runs(opts, cuda)
    if not cuda:
        print(f"[e2e] no CUDA: {CPU_DROPPED}; peak memory is the host RSS", flush=True)
    shim = False
    if any(s.impl == "sd-scripts" for s in runs) and opts.torchvision_shim != "off":
        shim = opts.torchvision_shim == "on" or not _torchvision_loads()
        if shim:
            print("[e2e] torchvision cannot load here: sd-scripts runs use bench/e2e_shim", flush=True)
    out = Path(opts.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    files = {m: write_models(m, opts, device) for m in dict.fromkeys(s.model for s in runs)}
    toml_path, shapes = _import_setup().write_dataset(
        out / f"dataset_{opts.dataset_scale}_{opts.images}x{opts.shapes}",
        opts.dataset_scale,
        opts.images,
        opts.shapes,
    )
    if opts.sample_every:
        write_prompts(out / f"prompts_{opts.dataset_scale}.txt", opts.dataset_scale)
    print(f"[e2e] {len(runs)} runs, {opts.images} images over buckets {shapes}; setup {time.time() - start:.1f} s",
          flush=True)  # fmt: skip
    rows: list[dict] = []
    start = time.time()  # the budget is for the runs: a fresh machine's one-time setup does not eat into it
    with open(out / "e2e.jsonl", "a", encoding="utf-8") as jl:
        for r in skipped:
            jl.write(json.dumps(r) + "\n")
        for spec in runs:
            left = opts.budget_s - (time.time() - start) if opts.budget_s else opts.run_timeout
            if left < opts.min_run_s:
                row = {"run": spec.name, "skipped": f"budget: {left:.0f} s left"}
            else:
                row = run_one(
                    spec, files[spec.model], toml_path, opts, cuda, shim, min(opts.run_timeout, left)
                )
            rows.append(row)
            jl.write(json.dumps(row) + "\n")
            jl.flush()
            brief = {
                k: v for k, v in row.items() if k not in ("losses", "step_times_s", "error_tail", "command")
            }
            print("E2E " + json.dumps(brief), flush=True)
            if row.get("error_tail"):
                print(row["error_tail"], flush=True)
    # the summary covers every run recorded in this folder (earlier invocations too), the latest of each name
    summary = markdown_summary(all_runs(out / "e2e.jsonl"))
    (out / "e2e_summary.md").write_text(summary, encoding="utf-8")
    print(summary, flush=True)
    return rows + skipped


if __name__ == "__main__":
    main()
