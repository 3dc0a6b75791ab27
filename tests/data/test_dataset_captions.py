"""Caption processing: prefix/suffix, dropout, wildcards, shuffle with kept tokens, tag dropout, separators."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from library.data.captions import (
    CaptionOptions,
    deterministic_caption,
    process_caption,
    read_caption_file,
    tag_frequency,
)

CAP = "sks dog, red collar, grass, sunny, park, running"


def test_prefix_suffix_and_secondary_separator() -> None:
    o = CaptionOptions(caption_prefix="best", caption_suffix="end", secondary_separator=";;;")
    assert process_caption("a;;;b, c", o) == "best a,b, c end"
    assert deterministic_caption("a;;;b\nline two", o) == "best a,b"


def test_shuffle_keeps_first_tokens_and_is_deterministic_under_seed() -> None:
    o = CaptionOptions(shuffle_caption=True, keep_tokens=2)
    outs = [process_caption(CAP, o, rng=random.Random(s)) for s in range(30)]
    for out in outs:
        tags = out.split(", ")
        assert tags[:2] == ["sks dog", "red collar"]
        assert sorted(tags[2:]) == sorted(["grass", "sunny", "park", "running"])
    assert len(set(outs)) > 5  # the tail really is shuffled
    assert outs[7] == process_caption(CAP, o, rng=random.Random(7))  # same seed -> same caption
    random.seed(123)
    a = process_caption(CAP, o)
    random.seed(123)
    assert process_caption(CAP, o) == a  # the global RNG path (sd-scripts) is deterministic too


def test_keep_tokens_separator_fixed_head_and_tail() -> None:
    o = CaptionOptions(shuffle_caption=True, keep_tokens=5, keep_tokens_separator="|||")
    for s in range(20):
        out = process_caption("1girl, solo ||| a, b, c, d ||| masterpiece, best", o, rng=random.Random(s))
        tags = out.split(", ")
        assert tags[:2] == ["1girl", "solo"] and tags[-2:] == ["masterpiece", "best"]
        assert sorted(tags[2:-2]) == ["a", "b", "c", "d"]


def test_caption_dropout_rate_and_every_n_epochs() -> None:
    o = CaptionOptions(caption_dropout_rate=0.25)
    rng = random.Random(0)
    outs = [process_caption("x, y", o, rng=rng) for _ in range(4000)]
    frac = outs.count("") / len(outs)
    assert 0.22 < frac < 0.28
    assert set(outs) == {"", "x, y"}
    o2 = CaptionOptions(caption_dropout_every_n_epochs=3)
    assert [process_caption("x", o2, epoch=e) for e in range(1, 7)] == ["x", "x", "", "x", "x", ""]


def test_tag_dropout_drops_only_flexible_tags() -> None:
    o = CaptionOptions(caption_tag_dropout_rate=0.5, keep_tokens=1)
    rng = random.Random(1)
    lengths = []
    for _ in range(500):
        tags = process_caption(CAP, o, rng=rng).split(", ")
        assert tags[0] == "sks dog"
        lengths.append(len(tags) - 1)
    assert 2.2 < sum(lengths) / len(lengths) < 2.8  # 5 flexible tags x 0.5 kept
    assert min(lengths) == 0 and max(lengths) == 5


def test_wildcards_and_multiline() -> None:
    o = CaptionOptions(enable_wildcard=True)
    rng = random.Random(0)
    outs = {process_caption("a {red|blue|green} car, {{literal}}", o, rng=rng) for _ in range(100)}
    assert outs == {f"a {c} car, {{literal}}" for c in ("red", "blue", "green")}
    outs = {process_caption("line one\nline two", o, rng=rng) for _ in range(100)}
    assert outs == {"line one", "line two"}
    # without wildcards only the first line is used and braces stay
    assert process_caption("a {x|y}\nsecond", CaptionOptions()) == "a {x|y}"


def test_token_warmup() -> None:
    o = CaptionOptions(token_warmup_min=1, token_warmup_step=10)
    cap = "t0, t1, t2, t3, t4, t5"
    # n = floor(step * (6 - 1) / 10) + 1
    assert process_caption(cap, o, step=0) == "t0"
    assert process_caption(cap, o, step=4) == "t0, t1, t2"
    assert process_caption(cap, o, step=10) == cap


def test_read_caption_file(tmp_path: Path) -> None:
    img = tmp_path / "a.png"
    assert read_caption_file(img, ".txt", False) is None
    (tmp_path / "a.txt").write_text("first line\n\n second \n")
    assert read_caption_file(img, ".txt", False) == "first line"
    assert read_caption_file(img, ".txt", True) == "first line\nsecond"
    (tmp_path / "a.caption").write_text("")
    with pytest.raises(ValueError, match=r"a\.caption is empty"):
        read_caption_file(img, ".caption", False)


def test_tag_frequency_lowercases() -> None:
    assert tag_frequency(["A, b", "a,  ", "B, c"]) == {"a": 2, "b": 2, "c": 1}
