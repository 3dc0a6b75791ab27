"""Prompt-line parsing (shared by gen_img.py and the trainer's sample prompts) and PNG metadata helpers."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from library.inference.prompt_options import (
    PromptOptionError,
    expand_multipliers,
    parse_prompt_line,
    read_prompt_file,
)
from library.io.png_metadata import (
    NetworkRecord,
    SdxlSizeConditioning,
    first_available_name,
    image_text_metadata,
    read_png_text,
    save_png,
    sequential_name,
    timestamped_name,
)


def test_all_inline_options_are_typed() -> None:
    line = (
        "masterpiece, 1girl, (red hair:1.2) --n lowres, bad hands --w 832 --h 1216 --d 1,2,3 --s 28 "
        "--l 6.5 --nl 4 --am 0.8,0.5 --ss euler_a --ow 2048 --oh 2048 --nw 512 --nh 640 --ct 16 --cl 8 "
        "--f portrait --t 0.6 --c clip text"
    )
    o = parse_prompt_line(line)
    assert o.prompt == "masterpiece, 1girl, (red hair:1.2)"
    assert o.negative_prompt == "lowres, bad hands"
    assert (o.width, o.height) == (832, 1216)
    assert o.seeds == [1, 2, 3]
    assert o.steps == 28
    assert o.scale == 6.5 and o.negative_scale == 4.0
    assert o.network_muls == [0.8, 0.5]
    assert o.sampler == "euler_a"
    assert (o.original_width, o.original_height) == (2048, 2048)
    assert (o.original_width_negative, o.original_height_negative) == (512, 640)
    assert (o.crop_top, o.crop_left) == (16, 8)
    assert o.filename == "portrait"
    assert o.strength == 0.6
    assert o.clip_prompt == "clip text"
    assert o.raw == line
    assert "nl" in o.given and "cn" not in o.given


def test_defaults_are_none_and_case_insensitive_names() -> None:
    o = parse_prompt_line("  a photo of a cat  ")
    assert o.prompt == "a photo of a cat"
    assert o.negative_prompt is None and o.width is None and o.seeds is None and o.given == set()
    o = parse_prompt_line("cat --W 640 --N dog")
    assert o.width == 640 and o.negative_prompt == "dog"


def test_steps_are_clamped_and_nl_none_and_last_wins() -> None:
    assert parse_prompt_line("x --s 5000").steps == 1000
    assert parse_prompt_line("x --s 0").steps == 1
    o = parse_prompt_line("x --nl none --w 64 --w 128")
    assert o.negative_scale is None and "nl" in o.given
    assert o.width == 128


def test_double_dash_inside_prompt_is_kept() -> None:
    o = parse_prompt_line("a -- b --n c")
    assert o.prompt == "a -- b" and o.negative_prompt == "c"


def test_unsupported_sd_scripts_options_are_recorded_not_fatal() -> None:
    o = parse_prompt_line("x --dsd1 3 --glt 650 --s 10")
    assert o.unsupported == {"dsd1": "3", "glt": "650"}
    assert o.steps == 10


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("x --zz 3", "unknown prompt option --zz"),
        ("x --w wide", "--w 'wide': expected an integer"),
        ("x --d 1,,2", "comma-separated integers"),
        ("x --am 1,a", "comma-separated numbers"),
        ("x --l", "--l needs a value"),
        ("x --nl many", "a number or 'none'"),
    ],
)
def test_bad_options_raise_one_clear_error(line: str, fragment: str) -> None:
    with pytest.raises(PromptOptionError) as e:
        parse_prompt_line(line)
    assert fragment in str(e.value)
    assert line in str(e.value)  # the error names the offending line


def test_prompt_file_skips_blank_and_comment_lines(tmp_path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("# header\n\na cat --d 5\n   \n  # indented comment\ndog --n cat\n", encoding="utf-8")
    lines = read_prompt_file(f)
    assert lines == ["a cat --d 5", "dog --n cat"]
    assert [parse_prompt_line(x).prompt for x in lines] == ["a cat", "dog"]
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        read_prompt_file(tmp_path / "missing.txt")


def test_expand_multipliers() -> None:
    assert expand_multipliers([0.5], 3) == [0.5, 0.5, 0.5]
    assert expand_multipliers([1.0, 0.2], 3) == [1.0, 0.2, 0.2]
    assert expand_multipliers(None, 2) is None
    with pytest.raises(PromptOptionError, match="3 values but only 2"):
        expand_multipliers([1, 2, 3], 2)
    with pytest.raises(PromptOptionError, match="no network"):
        expand_multipliers([1.0], 0)


def test_png_metadata_roundtrip_and_names(tmp_path) -> None:
    text = image_text_metadata(
        prompt="猫 a cat",
        seed=1234,
        sampler="euler_a",
        steps=20,
        scale=7.5,
        negative_prompt="",
        raw_prompt="猫 a cat --d 1234",
        size_conditioning=SdxlSizeConditioning(1024, 768, 1024, 768, 0, 0),
        networks=[NetworkRecord("networks.loha", "a.safetensors", 0.8, False)],
    )
    p = save_png(
        Image.new("RGB", (8, 8), (10, 20, 30)),
        tmp_path / "out" / timestamped_name("20260101120000", 3, 1234),
        text,
    )
    assert p.name == "im_20260101120000_003_1234.png"
    got = read_png_text(p)
    assert got["prompt"] == "猫 a cat" and got["seed"] == "1234" and got["sampler"] == "euler_a"
    assert got["steps"] == "20" and got["scale"] == "7.5" and got["negative-prompt"] == ""
    assert got["original-width"] == "1024" and got["original-height"] == "768" and got["crop-top"] == "0"
    assert "negative-scale" not in got
    assert json.loads(got["networks"]) == [
        {"module": "networks.loha", "weights": "a.safetensors", "multiplier": 0.8, "merged": False}
    ]
    assert [x.name for x in (tmp_path / "out").iterdir()] == [p.name]  # no temp file left behind
    assert sequential_name(7) == "im_000007.png"
    assert first_available_name(tmp_path / "out", p.name) == "im_20260101120000_003_1234_1.png"
    assert first_available_name(tmp_path / "out", "free.png") == "free.png"


def test_dynamic_prompts_random_enumerate_count_and_separator() -> None:
    import random

    from library.inference.prompt_options import expand_dynamic_prompt, has_dynamic_groups

    assert expand_dynamic_prompt("plain --n x", 3, random.Random(0)) == ["plain --n x"]
    assert not has_dynamic_groups("plain") and has_dynamic_groups("a {b|c}")
    # random pick per image, options outside the braces kept
    picks = expand_dynamic_prompt("a {cat|dog|fox} --d 1", 40, random.Random(0))
    assert len(picks) == 40 and set(picks) == {f"a {x} --d 1" for x in ("cat", "dog", "fox")}
    # e$$: every variant, cartesian product over enumerating groups, repeat count ignored
    assert expand_dynamic_prompt("{e$$red|blue} {e$$cat|dog}", 5, random.Random(0)) == [
        "red cat", "red dog", "blue cat", "blue dog"
    ]  # fmt: skip
    # n$$ / n-m$$: that many distinct variants, default separator ", ", custom one after the count
    two = expand_dynamic_prompt("{2$$a|b|c}", 20, random.Random(1))
    assert all(len(set(p.split(", "))) == 2 and set(p.split(", ")) <= {"a", "b", "c"} for p in two)
    assert expand_dynamic_prompt("{e$$1-2$$ and $$a|b}", 1, random.Random(0)) == ["a", "b", "a and b"]
    with pytest.raises(PromptOptionError, match="too many"):
        expand_dynamic_prompt("{e$$1$$,$$x$$a|b}", 1, random.Random(0))
