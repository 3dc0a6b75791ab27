"""gen_img.py command line: argument checks, seed planning and batching (no model needed)."""

from __future__ import annotations

import random

import pytest

import gen_img


def _args(*extra: str):
    return gen_img.parse_args(["--ckpt", "m.safetensors", *extra])


def _expect_exit(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        gen_img.parse_args(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_unknown_flag_is_rejected(capsys) -> None:
    err = _expect_exit(["--ckpt", "m", "--prompt", "x", "--no_such_flag"], capsys)
    assert "unrecognized arguments: --no_such_flag" in err


def test_network_count_must_match_multipliers_and_weights(tmp_path, capsys) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"x")
    b.write_bytes(b"x")
    base = ["--ckpt", "m", "--prompt", "x", "--network_module", "networks.lora", "networks.loha"]
    err = _expect_exit([*base, "--network_weights", str(a), str(b), "--network_mul", "0.8"], capsys)
    assert "--network_mul lists 1 value(s) for 2 network(s)" in err
    err = _expect_exit([*base, "--network_weights", str(a)], capsys)
    assert "--network_weights lists 1 file(s)" in err
    err = _expect_exit([*base, "--network_weights", str(a), str(b), "--network_args", "conv_dim=4"], capsys)
    assert "--network_args lists 1 string(s) for 2 network(s)" in err
    ok = gen_img.parse_args([*base, "--network_weights", str(a), str(b), "--network_mul", "0.8", "0.5"])
    assert ok.network_mul == [0.8, 0.5]


def test_missing_weights_file_is_one_clear_error(tmp_path, capsys) -> None:
    missing = tmp_path / "nope.safetensors"
    err = _expect_exit(
        [
            "--ckpt",
            "m",
            "--prompt",
            "x",
            "--network_module",
            "networks.loha",
            "--network_weights",
            str(missing),
        ],
        capsys,
    )
    assert f"--network_weights: file '{missing}' does not exist" in err


def test_unknown_sampler_and_unsupported_flags(capsys) -> None:
    err = _expect_exit(["--ckpt", "m", "--prompt", "x", "--sampler", "bogus_sampler"], capsys)
    assert "--sampler 'bogus_sampler' is not a known sampler" in err and "euler_a" in err
    err = _expect_exit(["--ckpt", "m", "--prompt", "x", "--image_path", "in.png"], capsys)
    assert "img2img" in err
    err = _expect_exit(["--ckpt", "m"], capsys)
    assert "give --prompt or --from_file" in err
    err = _expect_exit(["--ckpt", "m", "--prompt", "x", "--fp16", "--bf16"], capsys)
    assert "exclusive" in err


def test_network_args_string_syntax() -> None:
    assert gen_img.parse_network_kwargs("conv_dim=4; factor=8;") == {"conv_dim": "4", "factor": "8"}
    assert gen_img.parse_network_kwargs(None) == {}
    with pytest.raises(ValueError, match="has no '='"):
        gen_img.parse_network_kwargs("verbose")


def test_seed_planning_follows_sd_scripts() -> None:
    args = _args("--prompt", "x", "--seed", "42", "--images_per_prompt", "3")
    parsed = gen_img.parse_prompt_lines(args)
    jobs = gen_img.plan_iteration(args, parsed, gen_img.seed_source(args, 1), 0)
    # --seed seeds a generator that draws each image's seed
    r = random.Random(42)
    assert [j.seed for j in jobs] == [r.randint(0, 2**32 - 1) for _ in range(3)]
    # --d: one per image, the last one repeats
    args = _args("--prompt", "x --d 5,6", "--images_per_prompt", "4")
    jobs = gen_img.plan_iteration(args, gen_img.parse_prompt_lines(args), random.Random(0), 0)
    assert [j.seed for j in jobs] == [5, 6, 6, 6]
    # -1 switches to random seeds from that image on
    args = _args("--prompt", "x --d 7,-1", "--images_per_prompt", "3", "--seed", "1")
    jobs = gen_img.plan_iteration(args, gen_img.parse_prompt_lines(args), random.Random(1), 0)
    r = random.Random(1)
    assert [j.seed for j in jobs] == [7, r.randint(0, 2**32 - 1), r.randint(0, 2**32 - 1)]
    # --iter_same_seed: every prompt of the round shares one drawn seed
    args = _args("--prompt", "x", "--images_per_prompt", "2", "--iter_same_seed", "--seed", "3")
    jobs = gen_img.plan_iteration(args, gen_img.parse_prompt_lines(args), random.Random(3), 0)
    assert jobs[0].seed == jobs[1].seed == random.Random(3).randint(0, 2**32 - 1)


def test_one_line_file_one_image_uses_seed_as_is(tmp_path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("# c\na cat\n", encoding="utf-8")
    args = _args("--from_file", str(f), "--seed", "1234")
    rng = gen_img.seed_source(args, 1)
    assert rng is None
    assert [j.seed for j in gen_img.plan_iteration(args, gen_img.parse_prompt_lines(args), rng, 0)] == [1234]


def test_batches_split_on_differing_options_and_filenames(tmp_path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("a --d 1\nb --d 2\nc --w 512 --d 3 --f pic\nd --d 4 --am 0.5\n", encoding="utf-8")
    args = _args("--from_file", str(f), "--batch_size", "4", "--W", "1000", "--H", "768")
    jobs = gen_img.plan_iteration(args, gen_img.parse_prompt_lines(args), random.Random(0), 2)
    batches = gen_img.split_batches(jobs, 4)
    assert [[j.prompt for j in b] for b in batches] == [["a", "b"], ["c"], ["d"]]
    assert (batches[0][0].key.width, batches[0][0].key.height) == (1000, 768)  # already /8
    assert batches[1][0].key.width == 512 and batches[1][0].filename == "pic.png"
    assert batches[2][0].key.network_muls == (0.5, 0.5)  # last value repeated per network
    # size conditioning defaults: original = target, negative = original, crop 0
    k = batches[0][0].key
    assert (k.original_width, k.original_height, k.original_width_negative, k.crop_top) == (
        1000,
        768,
        1000,
        0,
    )
    # batch_size caps a batch
    assert [len(b) for b in gen_img.split_batches(jobs[:2], 1)] == [1, 1]
    # --f with several images per prompt numbers them
    args = _args("--prompt", "x --f out.png --d 1", "--images_per_prompt", "2")
    jobs = gen_img.plan_iteration(args, gen_img.parse_prompt_lines(args), random.Random(0), 0)
    assert [j.filename for j in jobs] == ["out_0.png", "out_1.png"]


def test_am_without_live_networks_is_an_error() -> None:
    args = _args("--prompt", "x --am 0.5")
    parsed = gen_img.parse_prompt_lines(args)
    with pytest.raises(ValueError, match="no live network"):
        gen_img.job_key(args, parsed[0], 0)


def test_sizes_floor_to_the_model_step() -> None:
    args = _args("--prompt", "x --w 1000", "--H", "1016")
    o = gen_img.parse_prompt_lines(args)[0]
    k = gen_img.job_key(args, o, 0, 32)  # SDXL: 8 (VAE) x 4 (U-Net) = 32
    assert (k.width, k.height) == (992, 992)
    with pytest.raises(ValueError, match="smaller than 32 pixels"):
        gen_img.job_key(
            _args("--prompt", "x --w 16"), gen_img.parse_prompt_lines(_args("--prompt", "x --w 16"))[0], 0, 32
        )


def test_dynamic_prompt_lines_plan_one_image_per_variant(tmp_path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("a {e$$cat|dog} --w {e$$512|768} --d 9 --f pet\n", encoding="utf-8")
    args = _args("--from_file", str(f), "--images_per_prompt", "3")
    jobs = gen_img.plan_iteration(args, gen_img.parse_prompt_lines(args), random.Random(0), 0)
    assert [(j.prompt, j.key.width, j.seed) for j in jobs] == [
        ("a cat", 512, 9), ("a cat", 768, 9), ("a dog", 512, 9), ("a dog", 768, 9)
    ]  # fmt: skip
    assert [j.filename for j in jobs] == ["pet_0.png", "pet_1.png", "pet_2.png", "pet_3.png"]
    # a bad option inside any variant is caught before models load
    f.write_text("a --w {512|wide}\n", encoding="utf-8")
    with pytest.raises(ValueError, match="--w 'wide'"):
        gen_img.parse_prompt_lines(_args("--from_file", str(f)))


def test_prompt_weighting_mode_flag(capsys) -> None:
    assert _args("--prompt", "a (cat:1.2)").emb_normalize_mode == "original"  # sd-scripts default
    assert _args("--prompt", "x", "--emb_normalize_mode", "abs").emb_normalize_mode == "abs"
    err = _expect_exit(["--ckpt", "m", "--prompt", "x", "--emb_normalize_mode", "max"], capsys)
    assert "invalid choice: 'max'" in err
