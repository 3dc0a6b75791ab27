"""sd-scripts compatible datasets: TOML config, DreamBooth/fine-tune subsets, buckets, captions, caches."""

from .buckets import BucketManager, get_crop_ltrb, make_bucket_resolutions
from .config import (
    DatasetConfigError,
    DatasetParams,
    SubsetParams,
    add_dataset_arguments,
    generate_params,
    load_user_config,
    user_config_from_args,
)
from .dataset import (
    BucketDataset,
    DatasetGroup,
    ImageInfo,
    build_dataset_group,
    collate_unwrap,
    make_dataloader,
)

__all__ = [
    "BucketDataset",
    "BucketManager",
    "DatasetConfigError",
    "DatasetGroup",
    "DatasetParams",
    "ImageInfo",
    "SubsetParams",
    "add_dataset_arguments",
    "build_dataset_group",
    "collate_unwrap",
    "generate_params",
    "get_crop_ltrb",
    "load_user_config",
    "make_bucket_resolutions",
    "make_dataloader",
    "user_config_from_args",
]
