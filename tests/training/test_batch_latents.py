"""Uncached latents are encoded `--vae_batch_size` images at a time (sd-scripts' rule; it bounds the VAE's
activation memory), and the chunks give the same latents as one encode of the whole batch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from library.training.architecture import TrainingArchitecture


class _RecordingVae:
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(images))
        # per image, like a VAE in eval mode: a 2×2 average pool of the channel mean
        return torch.nn.functional.avg_pool2d(images.mean(1, keepdim=True), 2)


@pytest.mark.parametrize(("vae_batch_size", "sizes"), [(1, [1, 1, 1, 1, 1]), (2, [2, 2, 1]), (None, [1] * 5),
                                                       (8, [5])])  # fmt: skip
def test_uncached_latents_encode_in_vae_batches(vae_batch_size, sizes):
    vae = _RecordingVae()
    arch = SimpleNamespace(encode_latents=vae)
    ctx = SimpleNamespace(args=SimpleNamespace(vae_batch_size=vae_batch_size), device=torch.device("cpu"))
    images = torch.randn(5, 3, 8, 6, generator=torch.Generator().manual_seed(0))
    latents = TrainingArchitecture.batch_latents(arch, ctx, {"images": images})
    assert vae.sizes == sizes
    whole = torch.nn.functional.avg_pool2d(images.mean(1, keepdim=True), 2)
    assert torch.equal(latents, whole)


def test_cached_latents_skip_the_vae():
    vae = _RecordingVae()
    ctx = SimpleNamespace(args=SimpleNamespace(vae_batch_size=1), device=torch.device("cpu"))
    cached = torch.randn(2, 4, 3, 3, dtype=torch.float16)
    out = TrainingArchitecture.batch_latents(SimpleNamespace(encode_latents=vae), ctx, {"latents": cached})
    assert vae.sizes == [] and out.dtype == torch.float32 and torch.equal(out, cached.float())
