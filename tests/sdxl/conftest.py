"""The tiny SDXL (real module tree and key layout) and its single-file checkpoint, for this folder's tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from library.sdxl.loading import SdxlModels, build_tiny_sdxl_models, save_sdxl_single_file


@pytest.fixture(scope="module")
def tiny(clip_tokenizer_dir: Path) -> SdxlModels:
    return build_tiny_sdxl_models(clip_tokenizer_dir, seed=0)


@pytest.fixture(scope="module")
def tiny_file(tiny: SdxlModels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny` saved as a float32 SGM single file."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny_sdxl.safetensors"
    save_sdxl_single_file(tiny, path)
    return path
