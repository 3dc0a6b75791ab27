"""The tiny SDXL training set-up (tests/helpers/train_sdxl.py) as a fixture for this folder's tests."""

import pytest
import torch

from tests.helpers.train_sdxl import tiny  # noqa: F401 - registers the fixture


@pytest.fixture
def full_fp32():
    """On a GPU, cuDNN convs and matmuls default to TF32 (10-bit mantissa), and eager and compiled or
    captured runs may pick different algorithms: comparisons between them run in fp32."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
