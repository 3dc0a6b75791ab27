"""sd-scripts compatible datasets: TOML config, DreamBooth/fine-tune subsets, buckets, captions, caches."""

from .buckets import BucketManager, get_crop_ltrb, make_bucket_resolutions
from .cache import cache_latents, cache_text_encoder_outputs, latents_npz_path, prepare_caches, te_npz_path
from .cache_rules import check_cache_args, check_latent_cache_compat, check_te_cache_compat
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
from .metadata import dataset_metadata

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
    "cache_latents",
    "cache_text_encoder_outputs",
    "check_cache_args",
    "check_latent_cache_compat",
    "check_te_cache_compat",
    "dataset_metadata",
    "latents_npz_path",
    "te_npz_path",
    "collate_unwrap",
    "generate_params",
    "get_crop_ltrb",
    "load_user_config",
    "make_bucket_resolutions",
    "make_dataloader",
    "prepare_caches",
    "user_config_from_args",
]
