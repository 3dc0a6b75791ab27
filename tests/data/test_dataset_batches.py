"""Batches: bucket-pure batches with repeats, per-epoch reshuffle under the seed, SDXL conditioning, loader."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.data import DatasetConfigError, add_dataset_arguments, build_dataset_group, make_dataloader


def write_png(path: Path, w: int, h: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return path


def make_args(train: Path, *extra: str, seed: int = 7) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_dataset_arguments(p)
    p.add_argument("--seed", type=int, default=None)
    return p.parse_args(
        ["--train_data_dir", str(train), "--resolution", "64", "--enable_bucket", "--min_bucket_reso", "32",
         "--max_bucket_reso", "128", "--bucket_reso_steps", "32", "--seed", str(seed),
         "--max_data_loader_n_workers", "0", *extra]
    )  # fmt: skip


def make_train(root: Path) -> Path:
    sizes = [(96, 64), (96, 64), (90, 60), (64, 64), (64, 64), (64, 64), (40, 120)]
    for i, (w, h) in enumerate(sizes):
        write_png(root / "3_obj" / f"{i}.png", w, h, i)
    return root


def epoch_keys(d) -> list[tuple[str, ...]]:
    return [tuple(d[i]["image_keys"]) for i in range(len(d))]


def test_batches_are_bucket_pure_with_repeats(tmp_path: Path) -> None:
    g = build_dataset_group(make_args(make_train(tmp_path), "--train_batch_size", "2"))
    d = g.datasets[0]
    # AR 1.5 images -> (64,64) (error .5 beats (96,32)'s 1.5); 40x120 (AR 1/3) -> (32,96) exactly
    assert {k: v["count"] for k, v in d.bucket_info["buckets"].items()} == {0: 3, 1: 18}
    assert [v["resolution"] for v in d.bucket_info["buckets"].values()] == [[32, 96], [64, 64]]
    assert len(d) == 2 + 9  # ceil(3/2) + ceil(18/2)
    sizes = []
    for i in range(len(d)):
        b = d[i]
        n = len(b["captions"])
        assert b["images"].shape[0] == n and b["images"].dtype == torch.float32
        assert -1.0 <= b["images"].min() and b["images"].max() <= 1.0
        assert (b["target_sizes_hw"] == torch.tensor(b["images"].shape[2:])).all()
        assert b["loss_weights"].tolist() == [1.0] * n and b["captions"] == ["obj"] * n
        sizes.append(n)
    assert sorted(sizes) == [1] + [2] * 10
    # every image appears num_repeats (3) times per epoch
    keys = [k for batch in epoch_keys(d) for k in batch]
    assert sorted(keys.count(k) for k in set(keys)) == [3] * 7


def test_conditioning_numbers(tmp_path: Path) -> None:
    write_png(tmp_path / "1_x" / "wide.png", 90, 60)
    d = build_dataset_group(make_args(tmp_path, "--flip_aug")).datasets[0]
    got = {}
    for _ in range(40):
        b = d[0]
        got[b["flipped"][0]] = (b["crop_top_lefts"][0].tolist(), b["images"][0])
        assert b["original_sizes_hw"][0].tolist() == [60, 90] and b["target_sizes_hw"][0].tolist() == [64, 64]
    # 90x60 in 64x64: letterbox fit (64, 42.67): top = floor(21.33/2) = 10, left 0 (mirror: 64-64 = 0)
    assert got[False][0] == [10, 0] and got[True][0] == [10, 0]
    assert torch.equal(got[True][1], torch.flip(got[False][1], dims=[2]))  # really mirrored
    # 90x60 cover-resized by 64/60 to (96, 64) with Lanczos (enlarging), centre crop left 16
    src = np.asarray(Image.open(tmp_path / "1_x" / "wide.png").convert("RGB").resize((96, 64), Image.LANCZOS))
    want = torch.from_numpy(src[:, 16:80].astype(np.float32).transpose(2, 0, 1) / 127.5 - 1.0)
    assert torch.allclose(got[False][1], want, atol=1e-6)


def test_epoch_reshuffle_is_seeded(tmp_path: Path) -> None:
    train = make_train(tmp_path)
    d1 = build_dataset_group(make_args(train)).datasets[0]
    d2 = build_dataset_group(make_args(train)).datasets[0]
    d3 = build_dataset_group(make_args(train, seed=8)).datasets[0]
    orders = []
    for epoch in (1, 2, 3):
        for d in (d1, d2, d3):
            d.set_current_epoch(epoch)
        e1 = epoch_keys(d1)
        assert e1 == epoch_keys(d2)  # same seed -> same order
        assert e1 != epoch_keys(d3)  # other seed -> other order
        orders.append(e1)
    assert orders[0] != orders[1] != orders[2]
    # jumping straight to epoch 3 (resume) gives the same order as stepping through 1, 2, 3
    d4 = build_dataset_group(make_args(train)).datasets[0]
    d4.set_current_epoch(3)
    assert epoch_keys(d4) == orders[2]


def test_dataloader_workers_follow_epochs(tmp_path: Path) -> None:
    train = make_train(tmp_path)
    args = make_args(train, "--train_batch_size", "2")
    args.max_data_loader_n_workers = 1
    args.persistent_data_loader_workers = True
    g = build_dataset_group(args)
    ref = build_dataset_group(make_args(train, "--train_batch_size", "2")).datasets[0]
    loader = make_dataloader(g, args, shuffle=False)
    assert loader.batch_size == 1 and loader.persistent_workers
    for epoch in (1, 2):
        g.set_current_epoch(epoch)
        ref.set_current_epoch(epoch)
        got = [tuple(b["image_keys"]) for b in loader]
        assert got == epoch_keys(ref)  # the worker process reshuffled exactly like the main process


def test_alpha_mask_uncached_and_cached(tmp_path: Path) -> None:
    from library.data import cache_latents

    d = tmp_path / "1_x"
    d.mkdir()
    rgba = np.zeros((64, 96, 4), dtype=np.uint8)
    rgba[..., :3] = 120
    rgba[..., 3] = np.arange(96, dtype=np.uint8)[None, :] * 2  # alpha grows left -> right
    Image.fromarray(rgba, "RGBA").save(d / "a.png")
    write_png(d / "b.png", 64, 64)  # no alpha channel -> fully opaque mask
    args = make_args(tmp_path, "--alpha_mask", "--flip_aug")
    ds = build_dataset_group(args).datasets[0]
    want = torch.from_numpy((np.arange(16, 80) * 2 / 255.0).astype(np.float32))[None, :].expand(64, 64)
    seen = set()
    for _ in range(30):
        for i in range(len(ds)):
            b = ds[i]
            m = b["alpha_masks"][0]
            assert m.shape == (64, 64)
            if b["image_keys"][0].endswith("a.png"):  # 96x64 -> bucket 64x64, centre crop columns 16..79
                assert torch.allclose(m, want.flip(1) if b["flipped"][0] else want, atol=1e-6)
                seen.add(b["flipped"][0])
            else:
                assert torch.equal(m, torch.ones(64, 64))
    assert seen == {True, False}

    class Pool:
        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.avg_pool2d(x, 8)

    g = build_dataset_group(args)
    cache_latents(g, Pool(), to_disk=True)
    with np.load(next(tmp_path.rglob("a_0096x0064_sdxl.npz"))) as z:
        assert np.allclose(z["alpha_mask"], want.numpy(), atol=1e-6)
    b = next(g.datasets[0][i] for i in range(2) if g.datasets[0][i]["image_keys"][0].endswith("a.png"))
    assert b["images"] is None and torch.allclose(
        b["alpha_masks"][0], want.flip(1) if b["flipped"][0] else want
    )
    # without alpha_mask no masks are produced
    assert build_dataset_group(make_args(tmp_path)).datasets[0][0]["alpha_masks"] is None


def test_bucket_no_upscale_dataset(tmp_path: Path) -> None:
    write_png(tmp_path / "1_x" / "a.png", 100, 70)
    write_png(tmp_path / "1_x" / "b.png", 200, 200)  # over 64x64 area -> shrunk to 64x64
    d = build_dataset_group(make_args(tmp_path, "--bucket_no_upscale")).datasets[0]
    # 100x70 (AR 1.4286, area 7000 > 4096): sqrt(4096*AR) = 76.5 wide, 53.5 high; width-led: w 64, h
    # round(44.8) -> 32, AR 2.0; height-led: h 32, w round(45.7) -> 32, AR 1.0 (error .43 < .57) wins:
    # resized (round(32*1.4286) = 46, 32), bucket (32, 32). 200x200 -> 64x64 both ways (tie -> height-led).
    assert [v["resolution"] for v in d.bucket_info["buckets"].values()] == [[32, 32], [64, 64]]
    a = d.image_data[str((tmp_path / "1_x" / "a.png").resolve())]
    assert (a.bucket_reso, a.resized_size) == ((32, 32), (46, 32))
    batch = next(d[i] for i in range(len(d)) if d[i]["image_keys"][0] == a.key)
    assert batch["images"].shape == (1, 3, 32, 32) and batch["original_sizes_hw"][0].tolist() == [70, 100]
    write_png(tmp_path / "1_x" / "tiny.png", 20, 20)
    with pytest.raises(
        DatasetConfigError, match=r"tiny.png \(20x20\): .* smaller than bucket_reso_steps \(32\)"
    ):
        build_dataset_group(make_args(tmp_path, "--bucket_no_upscale"))
