"""Bucket list, assignment, resize and crop numbers; golden values derived by hand from spec/sdxl.md §3."""

from __future__ import annotations

import pytest

from library.data.buckets import (
    BucketManager,
    adjust_min_max_bucket_reso,
    crop_top_left_for,
    get_crop_ltrb,
    make_bucket_resolutions,
)
from library.data.images import crop_offsets

# resolution 1024, steps 64, min 256, max 2048: height = min(2048, floor(1048576 // w / 64) * 64)
GOLDEN_1024 = [
    (256, 2048), (320, 2048), (384, 2048), (448, 2048),
    (512, 1856), (512, 1920), (512, 1984), (512, 2048),
    (576, 1664), (576, 1728), (576, 1792),
    (640, 1536), (640, 1600), (704, 1408), (704, 1472), (768, 1280), (768, 1344),
    (832, 1216), (896, 1152), (960, 1088), (1024, 1024), (1088, 960), (1152, 896), (1216, 832),
    (1280, 768), (1344, 768), (1408, 704), (1472, 704), (1536, 640), (1600, 640),
    (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512),
    (2048, 256), (2048, 320), (2048, 384), (2048, 448), (2048, 512),
]  # fmt: skip


def _manager(no_upscale: bool = False) -> BucketManager:
    bm = BucketManager(no_upscale, (1024, 1024), 256, 2048, 64)
    if no_upscale:
        bm.set_predefined_resos([])
    else:
        bm.make_buckets()
    return bm


def test_bucket_list_matches_hand_derived_golden() -> None:
    assert make_bucket_resolutions((1024, 1024), 256, 2048, 64) == GOLDEN_1024
    assert len(GOLDEN_1024) == 41


def test_small_bucket_list_512() -> None:
    # 512x512, min 256, max 1024, steps 64: 262144 // w
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == [
        (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
        (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
        (1024, 256),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "size,bucket,resized,ar_error",
    [
        ((1024, 1024), (1024, 1024), (1024, 1024), 0.0),  # exact bucket
        ((1920, 1080), (1344, 768), (1365, 768), 1344 / 768 - 1920 / 1080),  # scale by height
        ((600, 800), (896, 1152), (896, 1195), 896 / 1152 - 0.75),  # scale by width, 1194.67 -> 1195
        ((1000, 1300), (896, 1152), (896, 1165), 896 / 1152 - 1000 / 1300),
        ((300, 200), (1216, 832), (1248, 832), 1216 / 832 - 1.5),  # upscaled x4.16
    ],
)
def test_assignment_and_cover_resize(size, bucket, resized, ar_error) -> None:
    got_bucket, got_resized, err = _manager().select_bucket(*size)
    assert got_bucket == bucket
    assert got_resized == resized
    assert err == pytest.approx(ar_error)


def test_center_and_random_crop_offsets() -> None:
    assert crop_offsets((1365, 768), (1344, 768), random_crop=False) == (10, 0)
    assert crop_offsets((896, 1195), (896, 1152), random_crop=False) == (0, 21)
    import random

    rng = random.Random(0)
    offs = {crop_offsets((1365, 768), (1344, 768), True, rng) for _ in range(200)}
    assert all(0 <= left <= 21 and top == 0 for left, top in offs)
    assert len(offs) > 5  # really random


def test_letterbox_crop_conditioning() -> None:
    # bucket wider than image: fit by height; 1152 * (1000/1300) = 886.15 -> left 4, right 890.15
    ltrb = get_crop_ltrb((896, 1152), (1000, 1300))
    assert ltrb[0] == 4.0 and ltrb[1] == 0.0
    assert ltrb[2] == pytest.approx(890.1538, abs=1e-3)
    assert crop_top_left_for(ltrb, (896, 1152), flipped=False) == (0, 4)
    assert crop_top_left_for(ltrb, (896, 1152), flipped=True) == (0, 5)  # 896 - 890.15
    # bucket narrower than image: fit by width; 1344 / (1920/1080) = 756 -> top 6
    assert crop_top_left_for(get_crop_ltrb((1344, 768), (1920, 1080)), (1344, 768), False) == (6, 0)
    # 1216 / 1.5 = 810.67 -> top floor(21.33 / 2) = 10
    assert crop_top_left_for(get_crop_ltrb((1216, 832), (300, 200)), (1216, 832), False) == (10, 0)


def test_bucket_no_upscale() -> None:
    bm = _manager(no_upscale=True)
    # under the max area: keep size, bucket floored to 64
    assert bm.select_bucket(300, 200)[:2] == ((256, 192), (300, 200))
    # 1500x1000 over 1024^2: width-led AR 1216/768 vs height-led 1216/832 -> height-led wins
    assert bm.select_bucket(1500, 1000)[:2] == ((1216, 832), (1248, 832))
    # 2000x1000: both give AR 2.0 exactly -> height-led (tie goes to height)
    assert bm.select_bucket(2000, 1000)[:2] == ((1408, 704), (1408, 704))
    bm.sort()
    assert bm.resos == [(256, 192), (1216, 832), (1408, 704)]


def test_min_max_reso_rounding_and_bracket() -> None:
    assert adjust_min_max_bucket_reso((1024, 1024), 300, 2000, 64) == (256, 2048)
    with pytest.raises(ValueError, match="min_bucket_reso"):
        adjust_min_max_bucket_reso((512, 512), 640, 1024, 64)
    with pytest.raises(ValueError, match="max_bucket_reso"):
        adjust_min_max_bucket_reso((1024, 768), 256, 960, 64)
