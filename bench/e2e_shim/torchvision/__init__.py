"""A stand-in for the few torchvision pieces sd-scripts' trainers import, for a CPU box whose torchvision
build cannot load (its wheels need CUDA's torch). bench/bench_e2e.py puts it on the path only when asked
(--torchvision_shim); GPU runs use the real torchvision."""

from . import io, transforms

__version__ = "0.0.0+e2e-shim"
__all__ = ["io", "transforms"]
