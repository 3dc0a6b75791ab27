"""GPU benchmark: the fp8 weight upcast of every fp8 layer of the real SDXL U-Net and Anima DiT, torch's
copy against the Triton kernel (networks/kernels/fp8_dequant.py), plain and scaled, into bf16.

The layer shapes come from the real configs built on the meta device; each distinct shape is timed with CUDA
events (median of --iters, after a warm-up) and the per-model total is the sum over its layers. One training
step upcasts every layer about three times (forward, the checkpoint's recompute, grad-x). Each timed
kernel's output is checked against torch's, bit for bit. Prints one JSON line per model and variant.

    python bench/bench_fp8_dequant.py [--iters 30]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_timing import median_us  # noqa: E402

from networks.kernels import fp8_dequant  # noqa: E402


def layer_shapes(model: str) -> collections.Counter:
    with torch.device("meta"):
        if model == "sdxl":
            from diffusers import UNet2DConditionModel

            from library.sdxl.config import SDXL_UNET_CONFIG

            net = UNet2DConditionModel(**SDXL_UNET_CONFIG)
        else:
            from library.anima.model import Anima, AnimaConfig

            net = Anima(AnimaConfig())
    kinds = (torch.nn.Linear, torch.nn.Conv2d)
    return collections.Counter(tuple(m.weight.shape) for m in net.modules() if isinstance(m, kinds))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--models", default="sdxl,anima")
    args = ap.parse_args()
    if not torch.cuda.is_available() or fp8_dequant.triton is None:
        raise SystemExit("bench_fp8_dequant: needs a CUDA device and Triton")
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    for model in args.models.split(","):
        shapes = layer_shapes(model)
        for scaled in (False, True):
            tot_torch = tot_kernel = 0.0
            for shape, count in shapes.items():
                w8 = (
                    (torch.randn(shape, device=dev, generator=gen) * 40)
                    .clamp(-448, 448)
                    .to(torch.float8_e4m3fn)
                )
                scale = (torch.rand(shape[0], *([1] * (len(shape) - 1)), device=dev, generator=gen) * 0.01
                         if scaled else None)  # fmt: skip
                ref = (
                    w8.to(torch.bfloat16)
                    if scale is None
                    else w8.to(torch.bfloat16).mul_(scale.to(torch.bfloat16))
                )
                assert torch.equal(fp8_dequant.dequantize(w8, scale, torch.bfloat16), ref), (model, shape)
                t_torch = median_us(lambda w8=w8, s=scale: (w8.to(torch.bfloat16) if s is None
                                                            else w8.to(torch.bfloat16).mul_(s.to(torch.bfloat16))),
                                    args.iters, warmup=1)  # fmt: skip
                t_kernel = median_us(
                    lambda w8=w8, s=scale: fp8_dequant.dequantize(w8, s, torch.bfloat16), args.iters, warmup=1
                )
                tot_torch += t_torch * count
                tot_kernel += t_kernel * count
            print(json.dumps({"model": model, "scaled": scaled, "layers": sum(shapes.values()),
                              "distinct_shapes": len(shapes), "torch_ms_per_pass": round(tot_torch / 1000, 3),
                              "kernel_ms_per_pass": round(tot_kernel / 1000, 3),
                              "speedup": round(tot_torch / tot_kernel, 2), "gpu": torch.cuda.get_device_name()}),
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
