"""Latent / text-encoder caches: reuse when valid, rebuild when the image or settings change."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from library.data import (
    DatasetConfigError,
    add_dataset_arguments,
    build_dataset_group,
    cache_latents,
    cache_text_encoder_outputs,
    latents_npz_path,
)


def write_png(path: Path, w: int, h: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return path


class FakeVAE:
    """Deterministic stand-in for `vae.encode(x).latent_dist.sample()`: 8x average pool, 4 channels."""

    def __init__(self) -> None:
        self.encoded = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.encoded += images.shape[0]
        pooled = F.avg_pool2d(images, 8)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)


class FakeTE:
    def __init__(self) -> None:
        self.captions: list[str] = []

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        self.captions += captions
        codes = torch.tensor([[float(sum(map(ord, c)) % 997), float(len(c))] for c in captions])
        return {"hidden_state1": codes[:, None, :].repeat(1, 3, 1).to(torch.bfloat16), "pool2": codes}


def make_data(root: Path) -> Path:
    d = root / "train" / "2_sks"
    write_png(d / "a.png", 96, 64, 1)
    write_png(d / "b.png", 64, 96, 2)
    write_png(d / "c.png", 64, 64, 3)
    (d / "a.caption").write_text("a red thing")
    return root / "train"


def group_for(train: Path, *extra: str):
    p = argparse.ArgumentParser()
    add_dataset_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(
        ["--train_data_dir", str(train), "--resolution", "64", "--enable_bucket", "--min_bucket_reso", "32",
         "--max_bucket_reso", "128", "--bucket_reso_steps", "32", "--max_data_loader_n_workers", "0", *extra]
    )  # fmt: skip
    return build_dataset_group(args)


def test_latent_disk_cache_reuse_and_invalidation(tmp_path: Path) -> None:
    train = make_data(tmp_path)
    vae = FakeVAE()
    g = group_for(train, "--flip_aug")
    assert cache_latents(g, vae, to_disk=True, vae_batch_size=2) == 3
    assert vae.encoded == 6  # 3 images + 3 mirrored
    a = next(i for i in g.image_infos() if i.path.name == "a.png")
    npz_path = latents_npz_path(a.path, (96, 64))
    assert npz_path.name == "a_0096x0064_sdxl.npz" and npz_path.is_file()
    with np.load(npz_path) as npz:
        assert set(npz.files) == {"latents", "latents_flipped", "original_size", "crop_ltrb", "fingerprint"}
        assert npz["latents"].dtype == np.float32 and npz["latents"].shape == (4, 8, 8)  # bucket 64x64
        assert npz["original_size"].tolist() == [96, 64] and np.allclose(
            npz["crop_ltrb"], [0, 10, 64, 52.6667], atol=1e-3
        )
        # the stored latents are exactly the encoder output of the centre-cropped image
        img = np.asarray(Image.open(a.path).convert("RGB").resize((96, 64)), dtype=np.float32)[:, 16:80]
        x = torch.from_numpy(img.transpose(2, 0, 1) / 127.5 - 1.0)[None].float()
        assert np.allclose(npz["latents"], FakeVAE()(x)[0].numpy(), atol=1e-6)
        assert np.allclose(npz["latents_flipped"], FakeVAE()(torch.flip(x, dims=[3]))[0].numpy(), atol=1e-6)

    # a fresh run encodes nothing and fetches latents instead of images
    vae2 = FakeVAE()
    g2 = group_for(train, "--flip_aug")
    assert cache_latents(g2, vae2, to_disk=True, vae_batch_size=2) == 0 and vae2.encoded == 0
    d = g2.datasets[0]
    for i in range(len(d)):
        b = d[i]
        assert b["images"] is None and b["latents"].shape[1] == 4
        assert b["latents"].shape[2] * 8 == b["target_sizes_hw"][0, 0]

    # touching one image (new mtime) rebuilds exactly that file
    st = a.path.stat()
    os.utime(a.path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    vae3 = FakeVAE()
    assert cache_latents(group_for(train, "--flip_aug"), vae3, to_disk=True) == 1
    # ...unless the user asked to skip the check
    os.utime(a.path, ns=(st.st_atime_ns, st.st_mtime_ns + 9_000_000_000))
    assert cache_latents(group_for(train, "--flip_aug"), FakeVAE(), to_disk=True, skip_cache_check=True) == 0

    # dropping flip_aug changes the settings -> all rebuilt; a different resolution changes the buckets
    assert cache_latents(group_for(train), FakeVAE(), to_disk=True) == 3
    assert cache_latents(group_for(train), FakeVAE(), to_disk=True) == 0
    assert cache_latents(group_for(train, "--resolution", "96"), FakeVAE(), to_disk=True) == 3
    # a different VAE (caller settings) also invalidates
    assert (
        cache_latents(group_for(train, "--resolution", "96"), FakeVAE(), to_disk=True, settings="vae2") == 3
    )


def test_memory_cache_and_flip_conditioning(tmp_path: Path) -> None:
    train = make_data(tmp_path)
    g = group_for(train, "--flip_aug")
    assert cache_latents(g, FakeVAE(), to_disk=False) == 3
    assert not list(train.rglob("*.npz"))
    d = g.datasets[0]
    seen = set()
    for epoch in range(1, 6):
        d.set_current_epoch(epoch)
        for i in range(len(d)):
            b = d[i]
            for k, key in enumerate(b["image_keys"]):
                info = d.image_data[key]
                want = info.latents_flipped if b["flipped"][k] else info.latents
                assert torch.equal(b["latents"][k], want)
                if info.path.name == "a.png":  # 96x64 in bucket 64x64: letterbox l=0 t=10 r=64
                    assert b["crop_top_lefts"][k].tolist() == [10, 0]
                    assert b["original_sizes_hw"][k].tolist() == [64, 96]
                seen.add(b["flipped"][k])
    assert seen == {True, False}


def test_latent_cache_refuses_random_image_augs(tmp_path: Path) -> None:
    train = make_data(tmp_path)
    for flag in ("--color_aug", "--random_crop"):
        with pytest.raises(DatasetConfigError, match=flag[2:] + " cannot be used with latent caching"):
            cache_latents(group_for(train, flag), FakeVAE(), to_disk=False)


def test_te_cache_reuse_invalidation_and_batches(tmp_path: Path) -> None:
    train = make_data(tmp_path)
    te = FakeTE()
    assert cache_text_encoder_outputs(group_for(train), te, to_disk=True, batch_size=2) == 3
    assert sorted(te.captions) == ["a red thing", "sks", "sks"]
    npz = train / "2_sks" / "a_te_outputs.npz"
    with np.load(npz) as z:
        assert set(z.files) == {"hidden_state1", "pool2", "fingerprint"}
        assert z["hidden_state1"].dtype == np.float32 and z["hidden_state1"].shape == (3, 2)
    te2 = FakeTE()
    g = group_for(train)
    assert cache_text_encoder_outputs(g, te2, to_disk=True) == 0
    b = g.datasets[0][0]
    assert b["text_encoder_outputs"]["pool2"].shape == (1, 2)
    assert b["text_encoder_outputs"]["pool2"][0, 1] == len(b["captions"][0])

    # editing a caption file rebuilds that image only; a prefix (a setting) rebuilds all
    (train / "2_sks" / "a.caption").write_text("a blue thing")
    te3 = FakeTE()
    assert cache_text_encoder_outputs(group_for(train), te3, to_disk=True) == 1 and te3.captions == [
        "a blue thing"
    ]
    te4 = FakeTE()
    assert cache_text_encoder_outputs(group_for(train, "--caption_prefix", "photo"), te4, to_disk=True) == 3
    assert "photo a blue thing" in te4.captions  # sd-scripts would drop the prefix here ([Q], fixed)


def test_te_cache_refuses_caption_randomness(tmp_path: Path) -> None:
    train = make_data(tmp_path)
    for flags, name in [
        (["--shuffle_caption"], "shuffle_caption"),
        (["--caption_dropout_rate", "0.1"], "caption_dropout_rate"),
        (["--caption_tag_dropout_rate", "0.1"], "caption_tag_dropout_rate"),
        (["--token_warmup_step", "5"], "token_warmup_step"),
    ]:
        with pytest.raises(
            DatasetConfigError, match=name + " cannot be used with --cache_text_encoder_outputs"
        ):
            cache_text_encoder_outputs(group_for(train, *flags), FakeTE(), to_disk=False)
    g = group_for(train)
    assert cache_text_encoder_outputs(g, FakeTE(), to_disk=False) == 3
    assert not list(train.rglob("*.npz"))
    assert all(i.te_outputs is not None for i in g.image_infos())


def test_prepare_caches_from_flags_and_process_split(tmp_path: Path) -> None:
    from library.data import check_cache_args, prepare_caches

    train = make_data(tmp_path)

    class FakeAccelerator:  # two processes simulated one after the other
        def __init__(self, index: int) -> None:
            self.process_index, self.num_processes, self.is_local_main_process = index, 2, index == 0
            self.waits = 0

        def wait_for_everyone(self) -> None:
            self.waits += 1

    args = type("A", (), {"cache_latents_to_disk": True, "cache_text_encoder_outputs_to_disk": True})()
    # real ranks run concurrently and plan from the same (empty) cache; simulate each rank on its own copy
    written = []
    for rank in (0, 1):
        data = make_data(tmp_path / f"rank{rank}")
        acc, vae = FakeAccelerator(rank), FakeVAE()
        n = prepare_caches(group_for(data), args, encode_latents=vae, encode_text=FakeTE(), accelerator=acc)
        assert n == {"latents": 2 - rank, "text": 2 - rank} and vae.encoded == 2 - rank and acc.waits == 2
        written.append({p.name for p in data.rglob("*.npz")})
    assert written[0].isdisjoint(written[1]) and len(written[0] | written[1]) == 6  # a split, no overlap
    g = group_for(train)
    prepare_caches(g, args, encode_latents=FakeVAE(), encode_text=FakeTE())
    assert all(i.latents_npz is not None and i.te_npz is not None for i in g.image_infos())
    # afterwards a single process finds everything valid
    assert prepare_caches(group_for(train), args, encode_latents=FakeVAE(), encode_text=FakeTE()) == {
        "latents": 0,
        "text": 0,
    }
    with pytest.raises(DatasetConfigError, match="shuffle_caption"):
        check_cache_args(group_for(train, "--shuffle_caption"), args)
    with pytest.raises(ValueError, match="no encode_latents"):
        prepare_caches(group_for(train), args, encode_text=FakeTE())


def test_caption_dropout_flag_with_cached_text(tmp_path: Path) -> None:
    train = make_data(tmp_path)
    g = group_for(train, "--caption_dropout_rate", "0.5")
    with pytest.raises(DatasetConfigError, match="caption_dropout_rate"):
        cache_text_encoder_outputs(g, FakeTE(), to_disk=False)
    # a trainer that zeroes cached embeddings itself (Anima) allows it and reads `caption_dropped`
    assert cache_text_encoder_outputs(g, FakeTE(), to_disk=False, allow_caption_dropout=True) == 3
    d = g.datasets[0]
    flags = []
    for _ in range(60):
        for i in range(len(d)):
            b = d[i]
            assert b["text_encoder_outputs"] is not None
            for cap, dropped in zip(b["captions"], b["caption_dropped"]):
                assert (cap == "") == dropped
                flags.append(dropped)
    assert 0.4 < sum(flags) / len(flags) < 0.6
    # uncached text: the same flag marks the dropped captions
    d2 = group_for(train, "--caption_dropout_rate", "0.5").datasets[0]
    batches = [d2[i] for _ in range(20) for i in range(len(d2))]
    seen = {
        (cap == "", dropped) for b in batches for cap, dropped in zip(b["captions"], b["caption_dropped"])
    }
    assert seen == {(True, True), (False, False)}
