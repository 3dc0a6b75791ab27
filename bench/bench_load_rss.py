"""Peak host memory (RSS) of loading an SDXL single-file checkpoint, each load in a fresh process.

    python3 bench/bench_load_rss.py --ckpt /tmp/sdxl/sdxl_real.safetensors --write --dtypes fp32 bf16
    python3 bench/bench_load_rss.py --ckpt /tmp/sdxl/sdxl_real.safetensors --dtypes trainer_fp8 trainer_bf16
    python3 bench/bench_load_rss.py --ckpt /tmp/sdxl/sdxl_real.safetensors --root /tmp/older-checkout

`--write` first writes a random-init fp16 SDXL of the released size there (bench/e2e_setup.py, ~6.9 GB) when
the file is missing. Each line gives the dtype, the process's peak RSS (ru_maxrss) after the
imports and after the load, the size of the loaded weights and the load time. `--root` measures the loader
of another checkout of this project (e.g. `git archive` of an older commit unpacked somewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# "trainer_*": the SDXL trainer's load_models (--mixed_precision bf16, with or without --fp8_base), not the
# bare single-file reader
DTYPES = {
    "fp32": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "stored": None,
    "trainer_fp8": "trainer_fp8",
    "trainer_bf16": "trainer_bf16",
}

# runs in the child: `root` first on sys.path, so `library` is that checkout's package
_CHILD = """
import json, resource, sys, time
root, ckpt, dtype_name = sys.argv[1:4]
sys.path.insert(0, root)
import torch
from library.sdxl.loading import load_sdxl_single_file
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if dtype_name.startswith("trainer_"):  # the trainer's own load_models, with --fp8_base or without (bf16)
    from types import SimpleNamespace
    from library.sdxl.trainer import SdxlArchitecture
    args = SimpleNamespace(pretrained_model_name_or_path=ckpt, vae=None, tokenizer_cache_dir=None,
                           fp8_base=dtype_name == "trainer_fp8", fp8_scaled=False, no_half_vae=False)
    arch = SdxlArchitecture()
    arch.load_models(SimpleNamespace(args=args, weight_dtype=torch.bfloat16))
    parts = {k: getattr(arch.models, k) for k in ("unet", "vae", "text_encoder_1", "text_encoder_2")}
else:
    parts = load_sdxl_single_file(ckpt, None if dtype_name == "None" else getattr(torch, dtype_name))
seconds = time.perf_counter() - t0
models = [parts[k] for k in ("unet", "vae", "text_encoder_1", "text_encoder_2")]
weights = sum(t.numel() * t.element_size() for m in models for t in m.state_dict().values())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"imports_gib": before / 2**20, "peak_gib": peak / 2**20, "weights_gib": weights / 2**30,
                  "seconds": seconds}))
"""


def measure(root: Path, ckpt: Path, dtype: str | None) -> dict:
    """One load in a fresh process (ru_maxrss is in KiB on Linux)."""
    cmd = [sys.executable, "-c", _CHILD, str(root), str(ckpt), str(dtype)]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--ckpt", type=Path, required=True, help="SDXL single-file .safetensors")
    p.add_argument("--write", action="store_true", help="write a random real-size fp16 SDXL there if missing")
    p.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--root", type=Path, default=ROOT, help="the project checkout whose loader is measured")
    a = p.parse_args(argv)
    if a.write and not a.ckpt.is_file():
        sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
        from e2e_setup import write_sdxl

        write_sdxl(a.ckpt.parent, "real", "cpu")["ckpt"].rename(a.ckpt)
    for name in a.dtypes:
        r = measure(a.root, a.ckpt, DTYPES[name])
        print(
            f"{name:6s} peak RSS {r['peak_gib']:6.2f} GiB (after imports {r['imports_gib']:.2f}), "
            f"weights {r['weights_gib']:6.2f} GiB, load {r['seconds']:5.1f} s",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
