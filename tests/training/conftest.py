"""The tiny SDXL training set-up (tests/helpers/train_sdxl.py) as a fixture for this folder's tests."""

from tests.helpers.train_sdxl import tiny  # noqa: F401 - registers the fixture
