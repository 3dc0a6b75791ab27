"""Prompt lines with inline options, as written in `gen_img.py --from_file` files and `--sample_prompts`.

A line is `<prompt> --n <negative> --w 832 --h 1216 --d 1,2 --s 30 --l 7 ...`. Options are introduced by
" --" (space, two dashes) followed by a short name and a value; names are case-insensitive. The parser
is shared by the generator and the trainer's sample images, so it only turns text into typed values;
defaults and policy (which options a caller supports) stay with the caller.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import toml

logger = logging.getLogger(__name__)


class PromptOptionError(ValueError):
    """An inline prompt option that is unknown or carries a value of the wrong kind."""


# Option name -> (attribute, kind). Kinds: int, steps (int clamped to 1..1000), float, float_or_none,
# str (rest of the option text), ints / floats (comma-separated lists).
_OPTIONS: dict[str, tuple[str, str]] = {
    "n": ("negative_prompt", "str"),
    "w": ("width", "int"),
    "h": ("height", "int"),
    "d": ("seeds", "ints"),
    "s": ("steps", "steps"),
    "l": ("scale", "float"),
    "nl": ("negative_scale", "float_or_none"),
    "am": ("network_muls", "floats"),
    "ss": ("sampler", "str"),
    "ow": ("original_width", "int"),
    "oh": ("original_height", "int"),
    "nw": ("original_width_negative", "int"),
    "nh": ("original_height_negative", "int"),
    "ct": ("crop_top", "int"),
    "cl": ("crop_left", "int"),
    "f": ("filename", "str"),
    "t": ("strength", "float"),
    "c": ("clip_prompt", "str"),
}

# sd-scripts options for features this project does not implement (Deep Shrink, Gradual Latent,
# ControlNet samples). They are recognised so that existing prompt files still parse; callers warn.
_RECOGNISED_UNSUPPORTED = frozenset(
    {"dsd1", "dst1", "dsd2", "dst2", "dsr", "glt", "glr", "gle", "gls", "glsn", "glus", "cn", "ctr"}
)

# " --" followed by a letter starts an option; this is sd-scripts' split, restricted to option-looking
# tokens so that a prompt such as "a -- b" is not cut in two.
_SPLIT_RE = re.compile(r" --(?=[A-Za-z])")
_PART_RE = re.compile(r"([A-Za-z][A-Za-z0-9]*)(?:\s+(.*))?\Z", re.DOTALL)


@dataclass
class PromptOptions:
    """One parsed prompt line. `None` means "not given on the line": the caller applies its default."""

    prompt: str
    raw: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    seeds: list[int] | None = None
    steps: int | None = None
    scale: float | None = None
    negative_scale: float | None = None
    network_muls: list[float] | None = None
    sampler: str | None = None
    original_width: int | None = None
    original_height: int | None = None
    original_width_negative: int | None = None
    original_height_negative: int | None = None
    crop_top: int | None = None
    crop_left: int | None = None
    filename: str | None = None
    strength: float | None = None
    clip_prompt: str | None = None
    # option names present on the line (so "--nl none" can be told apart from "not given")
    given: set[str] = field(default_factory=set)
    # recognised sd-scripts options that this project does not implement, name -> raw value
    unsupported: dict[str, str] = field(default_factory=dict)


def _convert(name: str, kind: str, value: str, line: str) -> object:
    def bad(expected: str) -> PromptOptionError:
        return PromptOptionError(f"prompt option --{name} {value!r}: expected {expected} (in line {line!r})")

    try:
        if kind == "str":
            return value
        if kind == "int":
            return int(value)
        if kind == "steps":
            # sd-scripts clamps the step count instead of rejecting it
            return max(1, min(1000, int(value)))
        if kind == "float":
            return float(value)
        if kind == "float_or_none":
            return None if value.lower() == "none" else float(value)
        if kind in ("ints", "floats"):
            items = [v.strip() for v in value.split(",")]
            if any(v == "" for v in items):
                raise ValueError(value)
            conv = int if kind == "ints" else float
            return [conv(v) for v in items]
    except ValueError:
        expected = {
            "int": "an integer",
            "steps": "an integer step count",
            "float": "a number",
            "float_or_none": "a number or 'none'",
            "ints": "comma-separated integers",
            "floats": "comma-separated numbers",
        }[kind]
        raise bad(expected) from None
    raise AssertionError(f"unhandled option kind {kind}")


def parse_prompt_line(line: str) -> PromptOptions:
    """Split a prompt line into the prompt text and its typed inline options.

    Unknown option names raise `PromptOptionError`; a later occurrence of an option wins.
    """
    raw = line.strip()
    parts = _SPLIT_RE.split(raw)
    opts = PromptOptions(prompt=parts[0].strip(), raw=raw)
    for part in parts[1:]:
        m = _PART_RE.match(part.strip())
        if m is None:  # cannot happen after the split's lookahead, kept as a guard
            raise PromptOptionError(f"cannot parse prompt option --{part!r} in line {raw!r}")
        name = m.group(1).lower()
        value = (m.group(2) or "").strip()
        if name in _RECOGNISED_UNSUPPORTED:
            opts.unsupported[name] = value
            continue
        if name not in _OPTIONS:
            known = ", ".join(f"--{k}" for k in _OPTIONS)
            raise PromptOptionError(f"unknown prompt option --{name} in line {raw!r}; known options: {known}")
        attr, kind = _OPTIONS[name]
        if value == "" and kind != "str":
            raise PromptOptionError(f"prompt option --{name} needs a value (in line {raw!r})")
        setattr(opts, attr, _convert(name, kind, value, raw))
        opts.given.add(name)
    return opts


# sd-scripts prompt-dict keys -> the inline option that carries the same value. `flow_shift` is Anima's
# `--fs` (its sampler reads it off the line); `enum` is sd-scripts' own bookkeeping.
_DICT_KEYS = {
    "negative_prompt": "n",
    "width": "w",
    "height": "h",
    "seed": "d",
    "sample_steps": "s",
    "scale": "l",
    "sample_sampler": "ss",
    "flow_shift": "fs",
}


def _dict_to_line(entry: object, where: str) -> str:
    """One sd-scripts prompt dict ({"prompt": ..., "width": ..., ...}) as an inline-option line."""
    if isinstance(entry, str):
        return entry
    if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
        raise PromptOptionError(
            f"{where}: expected a table with a string 'prompt' (or a prompt line), got {entry!r}"
        )
    parts = [entry["prompt"].strip()]
    for key, value in entry.items():
        if key in ("prompt", "enum", "subset"):
            continue
        opt = _DICT_KEYS.get(key)
        if opt is None:
            logger.warning("%s: prompt key %r is not supported here and is ignored", where, key)
            continue
        parts.append(f"--{opt} {value}")
    return " ".join(parts)


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompt lines of a prompt file, as sd-scripts reads `--sample_prompts`.

    A text file has one prompt per line (blank lines and `#` comments skipped). A `.toml` file has a
    `[prompt]` table of defaults and `[[prompt.subset]]` entries; a `.json` file is a list of prompt
    dicts or lines. Dict entries become the equivalent inline-option line (`width` -> `--w` ...).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"prompt file not found: {p} (expected a text file with one prompt per line, or a .toml/.json)"
        )
    suffix = p.suffix.lower()
    if suffix not in (".toml", ".json"):
        lines = p.read_text(encoding="utf-8-sig").splitlines()  # a BOM must not reach the first prompt
        return [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    try:
        if suffix == ".toml":
            data = toml.loads(p.read_text(encoding="utf-8-sig"))
            table = data.get("prompt")
            subsets = table.get("subset") if isinstance(table, dict) else None
            if not isinstance(subsets, list):
                raise PromptOptionError(
                    f"prompt file {p}: expected a [prompt] table with [[prompt.subset]] entries"
                )
            defaults = {k: v for k, v in table.items() if k != "subset"}
            entries: list[object] = [{**defaults, **s} if isinstance(s, dict) else s for s in subsets]
        else:
            entries = json.loads(p.read_text(encoding="utf-8-sig"))
            if not isinstance(entries, list):
                raise PromptOptionError(f"prompt file {p}: expected a JSON list of prompt objects or lines")
    except (toml.TomlDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:  # one clear error
        raise PromptOptionError(f"prompt file {p} cannot be parsed: {e}") from e
    return [_dict_to_line(e, f"prompt file {p}, entry {i + 1}") for i, e in enumerate(entries)]


def expand_multipliers(values: list[float] | None, count: int, what: str = "--am") -> list[float] | None:
    """Pad a per-network multiplier list to `count` entries by repeating its last value.

    More values than networks is an error: silently dropping a multiplier hides a typo.
    """
    if values is None:
        return None
    if count == 0:
        raise PromptOptionError(f"{what} {values} given but no network is loaded")
    if len(values) > count:
        raise PromptOptionError(f"{what} has {len(values)} values but only {count} network(s) are loaded")
    return list(values) + [values[-1]] * (count - len(values))


# ------------------------------------------------------------------------------ dynamic prompts
# sd-scripts' gen_img.py syntax: `{a|b|c}` picks one variant per image; leading `$$` fragments add
# `e` (enumerate every variant: one prompt each), a count `n` or range `n-m` (join that many distinct
# variants) and a separator (default ", "): `{e$$a|b}`, `{2$$a|b|c}`, `{1-3$$ and $$a|b|c}`.
_GROUP_RE = re.compile(r"\{([^{}]*)\}")
_RANGE_RE = re.compile(r"(\d+)(?:-(\d+))?\Z")


@dataclass
class _Group:
    span: tuple[int, int]
    variants: list[str]
    enumerate_all: bool
    count: tuple[int, int]
    separator: str


def _parse_group(m: re.Match[str], line: str) -> _Group:
    parts = m.group(1).split("$$")
    variants, head = parts[-1].split("|"), parts[:-1]
    enum = bool(head) and head[0].lower() == "e"
    if enum:
        head = head[1:]
    count = (1, 1)
    if head and _RANGE_RE.match(head[0]):
        r = _RANGE_RE.match(head[0])
        assert r is not None
        lo = int(r.group(1))
        hi = int(r.group(2)) if r.group(2) is not None else lo
        count = (max(0, min(lo, hi)), min(len(variants), max(lo, hi)))
        head = head[1:]
    separator = ", "
    if head:
        separator, head = head[0], head[1:]
    if head:
        raise PromptOptionError(
            f"dynamic prompt group {m.group(0)!r} has too many '$$' fragments (in line {line!r})"
        )
    return _Group(m.span(), variants, enum, count, separator)


def _choices(g: _Group) -> list[str]:
    """Every value an enumerating group takes."""
    out = []
    for k in range(g.count[0], g.count[1] + 1):
        out += [g.separator.join(c) for c in itertools.combinations(g.variants, k)]
    return out


def _pick(g: _Group, rnd: random.Random) -> str:
    k = rnd.randint(g.count[0], g.count[1])
    return g.separator.join(rnd.sample(g.variants, k))


def has_dynamic_groups(line: str) -> bool:
    return _GROUP_RE.search(line) is not None


def expand_dynamic_prompt(
    line: str, repeat: int, rnd: random.Random, all_variants: bool = False
) -> list[str]:
    """The prompt lines a dynamic line stands for.

    No group: `[line]`. With enumerating groups: one line per combination of their values (other
    groups drawn at random per line). Otherwise `repeat` lines with random picks. `all_variants`
    enumerates every group (to check every variant's options up front).
    """
    groups = [_parse_group(m, line) for m in _GROUP_RE.finditer(line)]
    if not groups:
        return [line]
    if all_variants:
        groups = [_Group(g.span, g.variants, True, (1, 1), g.separator) for g in groups]
    enum_values = [_choices(g) for g in groups if g.enumerate_all]
    combos: list[tuple[str, ...]] = list(itertools.product(*enum_values)) if enum_values else [()] * repeat
    lines = []
    for combo in combos:
        values = iter(combo)
        out, pos = [], 0
        for g in groups:
            out.append(line[pos : g.span[0]])
            out.append(next(values) if g.enumerate_all else _pick(g, rnd))
            pos = g.span[1]
        out.append(line[pos:])
        lines.append("".join(out))
    return lines
