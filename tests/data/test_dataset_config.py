"""Dataset TOML schema, precedence, CLI-only DreamBooth folders, bad-input errors, ss_* metadata."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from library.data import (
    DatasetConfigError,
    add_dataset_arguments,
    build_dataset_group,
    dataset_metadata,
    generate_params,
    load_user_config,
)


def write_png(path: Path, w: int, h: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return path


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_dataset_arguments(p)
    p.add_argument("--seed", type=int, default=42)
    return p.parse_args(argv + ["--max_data_loader_n_workers", "0"])


def test_add_dataset_arguments_defaults() -> None:
    a = parse([])
    assert (a.train_batch_size, a.min_bucket_reso, a.max_bucket_reso, a.bucket_reso_steps) == (
        1,
        256,
        1024,
        64,
    )
    assert (a.caption_extension, a.caption_separator, a.keep_tokens, a.prior_loss_weight) == (
        ".caption",
        ",",
        0,
        1.0,
    )
    assert a.max_data_loader_n_workers == 0 and a.vae_batch_size == 1 and a.dataset_repeats == 1
    assert a.enable_bucket is False and a.cache_text_encoder_outputs is False and a.token_warmup_min == 1


def test_precedence_subset_dataset_general_cli_default(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        """
[general]
shuffle_caption = true
keep_tokens = 3
caption_extension = ".txt"
[[datasets]]
resolution = [768, 512]
keep_tokens = 2
batch_size = 4
  [[datasets.subsets]]
  image_dir = "a"
  keep_tokens = 1
  num_repeats = 5
  [[datasets.subsets]]
  image_dir = "b"
[[datasets]]
  [[datasets.subsets]]
  image_dir = "c"
"""
    )
    args = parse(["--resolution", "640", "--flip_aug", "--caption_prefix", "pre", "--train_batch_size", "3"])
    ds = generate_params(load_user_config(cfg), args)
    a, b = ds[0].subsets
    assert (
        a.keep_tokens == 1 and b.keep_tokens == 2 and ds[1].subsets[0].keep_tokens == 3
    )  # subset>dataset>general
    assert a.shuffle_caption and a.caption_extension == ".txt"  # from [general]
    assert a.flip_aug and a.caption_prefix == "pre"  # from the CLI
    assert a.num_repeats == 5 and b.num_repeats == 1  # default via --dataset_repeats 1
    assert b.caption_dropout_rate == 0.0 and b.keep_tokens_separator == ""  # CLI defaults
    assert ds[0].resolution == (768, 512) and ds[1].resolution == (640, 640)
    assert ds[0].batch_size == 4 and ds[1].batch_size == 3  # --train_batch_size maps to batch_size


@pytest.mark.parametrize(
    "text,match",
    [
        ('[general]\nshufle_caption = true\n', r"unknown key 'shufle_caption' in \[general\]"),
        ('[[datasets]]\nfoo = 1\n[[datasets.subsets]]\nimage_dir="x"\n', r"unknown key 'foo' in \[\[datasets\]\] #1"),
        ('[[datasets]]\n[[datasets.subsets]]\nimage_dir="x"\nbatch_size=2\n',
         r"unknown key 'batch_size' in \[\[datasets.subsets\]\] #1 of dataset #1"),
        ('[[datasets]]\n[[datasets.subsets]]\nimage_dir="x"\nnum_repeats="3"\n', r"'num_repeats' must be int"),
        ('[[datasets]]\n[[datasets.subsets]]\nclass_tokens="x"\n', r"needs 'image_dir'"),
        ("[other]\n", r"unknown key 'other' at the top level"),
        ('[[datasets]]\nimage_dir = "x"\n', r"'image_dir' in \[\[datasets\]\] #1 .*belongs in \[\[datasets.subsets\]\]"),
        ('[general]\nresolution = "big"\n', r"resolution must be an int"),
        ("[[datasets]\n", r"not valid"),
    ],
)  # fmt: skip
def test_bad_config_one_clear_error(tmp_path: Path, text: str, match: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(DatasetConfigError, match=match):
        load_user_config(cfg)


def test_json_config_and_missing_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"datasets": [{"resolution": 256, "subsets": [{"image_dir": "x"}]}]}))
    assert generate_params(load_user_config(cfg), None)[0].resolution == (256, 256)
    with pytest.raises(DatasetConfigError, match="does not exist"):
        load_user_config(tmp_path / "nope.toml")


def test_dreambooth_folders_cli(tmp_path: Path) -> None:
    train, reg = tmp_path / "train", tmp_path / "reg"
    for i in range(3):
        write_png(train / "10_sks dog" / f"{i}.png", 64, 64, i)
    write_png(train / "2_cat" / "a.png", 64, 64)
    (train / "2_cat" / "a.caption").write_text("a cat, sitting\nsecond line ignored\n")
    (train / "no_repeats").mkdir()
    write_png(train / "no_repeats" / "x.png", 64, 64)
    for i in range(3):
        write_png(reg / "1_dog" / f"r{i}.png", 64, 64, 10 + i)
    args = parse(["--train_data_dir", str(train), "--reg_data_dir", str(reg), "--resolution", "64",
                  "--prior_loss_weight", "0.5"])  # fmt: skip
    g = build_dataset_group(args)
    d = g.datasets[0]
    subs = {Path(s.image_dir).name: s for s in d.subsets}
    assert set(subs) == {"10_sks dog", "2_cat", "1_dog"}  # no_repeats ignored (warning)
    assert subs["10_sks dog"].num_repeats == 10 and subs["10_sks dog"].class_tokens == "sks dog"
    assert subs["1_dog"].is_reg
    assert d.num_train_images == 3 * 10 + 2
    # reg: 3 images registered once (n=3), then +1 round-robin r0,r1,r2,r0,... until n=32 (29 more);
    # num_reg_images is the count before that fill, as sd-scripts writes it to ss_num_reg_images
    assert d.num_reg_images == 3
    reg_repeats = {i.path.name: i.num_repeats for i in d.image_data.values() if i.is_reg}
    assert reg_repeats == {"r0.png": 11, "r1.png": 11, "r2.png": 10}
    captions = {i.path.name: i.caption for i in d.image_data.values()}
    assert captions["a.png"] == "a cat, sitting" and captions["0.png"] == "sks dog"
    assert len(d) == 64  # 32 train + 32 reg images, batch size 1
    batch = d[0]
    assert batch["images"].shape == (1, 3, 64, 64)
    weights = [float(d[i]["loss_weights"][0]) for i in range(len(d))]
    assert weights.count(0.5) == 32 and weights.count(1.0) == 32

    md = dataset_metadata(g, args, total_batch_size=1)
    assert all(isinstance(v, str) for v in md.values())
    assert md["ss_num_train_images"] == "32" and md["ss_num_reg_images"] == "3"
    assert (
        md["ss_resolution"] == "(64, 64)"
        and md["ss_enable_bucket"] == "False"
        and md["ss_keep_tokens"] == "0"
    )
    assert json.loads(md["ss_dataset_dirs"]) == {
        "10_sks dog": {"n_repeats": 10, "img_count": 3},
        "2_cat": {"n_repeats": 2, "img_count": 1},
    }
    assert json.loads(md["ss_reg_dataset_dirs"]) == {"1_dog": {"n_repeats": 1, "img_count": 3}}
    assert json.loads(md["ss_tag_frequency"])["2_cat"] == {"a cat": 1, "sitting": 1}
    assert json.loads(md["ss_bucket_info"])["buckets"] == {"0": {"resolution": [64, 64], "count": 64}}


def test_missing_image_dir_and_train_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetConfigError, match="--train_data_dir .* is not a directory"):
        build_dataset_group(parse(["--train_data_dir", str(tmp_path / "none"), "--resolution", "64"]))
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "gone"}"\n'  # no resolution either
    )
    with pytest.raises(DatasetConfigError, match=r"image_dir .*gone does not exist"):
        build_dataset_group(parse(["--dataset_config", str(cfg)]))
    cfg.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{tmp_path}"\n')
    with pytest.raises(DatasetConfigError, match="dataset #1: no resolution"):
        build_dataset_group(parse(["--dataset_config", str(cfg)]))
    with pytest.raises(DatasetConfigError, match="no training data"):
        build_dataset_group(parse([]))


def test_unreadable_image_skipped_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "1_x"
    write_png(d / "good.png", 64, 64)
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    (d / "text.jpg").write_text("hello")
    with caplog.at_level(logging.WARNING):
        g = build_dataset_group(parse(["--train_data_dir", str(tmp_path), "--resolution", "64"]))
    assert [i.path.name for i in g.image_infos()] == ["good.png"]
    assert "broken.png" in caplog.text and "text.jpg" in caplog.text


def test_config_metadata_and_finetune_subset(tmp_path: Path) -> None:
    img_dir = tmp_path / "imgs"
    write_png(img_dir / "a.png", 96, 64)
    write_png(img_dir / "b.png", 64, 96)
    md_file = tmp_path / "meta.json"
    md_file.write_text(
        json.dumps({"a": {"caption": "photo", "tags": "red, Blue"}, "b.png": {"tags": "blue"}})
    )
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f"""
[general]
enable_bucket = true
[[datasets]]
resolution = 64
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 32
  [[datasets.subsets]]
  image_dir = "{img_dir}"
  metadata_file = "{md_file}"
  num_repeats = 2
"""
    )
    args = parse(["--dataset_config", str(cfg)])
    g = build_dataset_group(args)
    d = g.datasets[0]
    assert not d.is_dreambooth
    assert sorted(i.caption for i in d.image_data.values()) == ["blue", "photo,red, Blue"]
    md = dataset_metadata(g, args)
    ds = json.loads(md["ss_datasets"])
    assert ds[0]["is_dreambooth"] is False and ds[0]["num_train_images"] == 4
    assert ds[0]["subsets"][0]["metadata_file"] == "meta.json" and ds[0]["subsets"][0]["img_count"] == 2
    # buckets of 64x64 area, step 32: (32,96) (32,128) (64,64) (96,32) (128,32); 96x64 (AR 1.5) -> 64x64;
    # 64x96 (AR 0.667) -> |0.333-0.667| < |1-0.667| by float rounding -> 32x96
    assert ds[0]["bucket_info"]["buckets"] == {"0": {"resolution": [32, 96], "count": 2},
                                               "1": {"resolution": [64, 64], "count": 2}}  # fmt: skip
    assert json.loads(md["ss_tag_frequency"]) == {"meta.json": {"red": 1, "blue": 2}}  # tags only
    assert json.loads(md["ss_dataset_dirs"]) == {"meta.json": {"n_repeats": 2, "img_count": 2}}


def test_mixed_kinds_and_bucket_step_rules(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[[datasets]]\nresolution=64\n[[datasets.subsets]]\nimage_dir="a"\n'
        '[[datasets.subsets]]\nmetadata_file="m.json"\n'
    )
    with pytest.raises(DatasetConfigError, match="mixes DreamBooth"):
        build_dataset_group(parse(["--dataset_config", str(cfg)]))
    write_png(tmp_path / "t" / "1_a" / "x.png", 64, 64)
    with pytest.raises(DatasetConfigError, match="bucket_reso_steps 48 must be a multiple of 32"):
        build_dataset_group(
            parse(
                [
                    "--train_data_dir",
                    str(tmp_path / "t"),
                    "--resolution",
                    "64",
                    "--enable_bucket",
                    "--bucket_reso_steps",
                    "48",
                ]
            )  # fmt: skip
        )


def test_in_json_cli_form_and_no_bucket_mode(tmp_path: Path) -> None:
    img_dir = tmp_path / "imgs"
    write_png(img_dir / "wide.png", 120, 60)
    write_png(img_dir / "big.png", 128, 96)
    md = tmp_path / "meta.jsonl"
    md.write_text(
        json.dumps({"image_path": "wide.png", "caption": "w"})
        + "\n"
        + json.dumps({"image_path": "big", "tags": "t"})
    )
    g = build_dataset_group(parse(["--in_json", str(md), "--train_data_dir", str(img_dir), "--resolution", "64,32",
                                   "--dataset_repeats", "3"]))  # fmt: skip
    d = g.datasets[0]
    assert d.num_train_images == 6 and not d.enable_bucket
    assert d.bucket_info["buckets"] == {0: {"resolution": [64, 32], "count": 6}}
    seen = {}
    for i in range(len(d)):
        b = d[i]
        seen[b["captions"][0]] = b
        assert b["images"].shape == (1, 3, 32, 64)  # every image covers 64x32 and is centre-cropped
    assert set(seen) == {"w", "t"}
    # 120x60 has the bucket's AR: letterbox fills the bucket; 128x96 (AR 4/3) in 64x32 -> fit (42.67, 32), left 10
    assert seen["w"]["crop_top_lefts"][0].tolist() == [0, 0]
    assert seen["t"]["crop_top_lefts"][0].tolist() == [0, 10]
    assert seen["t"]["original_sizes_hw"][0].tolist() == [96, 128]
