"""Parsing of `--network_args` for the LoRA / LoHa / LoKr networks.

Values reach `create_network` as strings (sd-scripts' trainer splits each token at the first `=`),
as native Python values (callers in code) or as None (= not given), so every converter accepts all three.
"""

from __future__ import annotations

import ast
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any

logger = logging.getLogger(__name__)

ALGORITHMS = ("lora", "loha", "lokr")

# Keys LyCORIS understands but we do not: a hint beats "unknown key" for users switching over.
LYCORIS_ONLY_KEYS = {
    "algo": "choose the algorithm with --network_module networks.loha / networks.lokr / networks.lora",
    "preset": "select modules with exclude_patterns / include_patterns instead",
    "dora_wd": "DoRA is not supported",
    "weight_decompose": "DoRA is not supported",
    "wd_on_output": "DoRA is not supported",
    "bypass_mode": "the bypass path is chosen automatically",
    "rs_lora": "rank-stabilised scaling is not supported; set network_alpha instead",
    "use_cp": "use use_tucker=True",
    "train_norm": "norm layers are never trained",
    "rank_dropout_scale": "rank_dropout always rescales by 1/(1-p)",
    "constraint": "OFT/BOFT are not supported",
    "rescaled": "OFT/BOFT are not supported",
    "block_size": "OFT/BOFT are not supported",
    "unbalanced_factorization": "use factor=N",
    "disable_conv_cp": "use use_tucker=False",
    "dora_scale": "DoRA is not supported",
}

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class NetworkArgError(ValueError):
    """A `--network_args` value is missing, unknown or malformed (the message names the key)."""


def split_key_values(tokens: Iterable[str], syntax: str) -> dict[str, str]:
    """`--network_args` tokens split at their first `=`; keys and values stay strings (stripped).

    `syntax` shows the expected form in the error, as the caller's flag spells it.
    """
    kwargs: dict[str, str] = {}
    for token in tokens:
        if "=" not in token:
            raise NetworkArgError(
                f"--network_args: {token!r} is not key=value (it has no '='; expected {syntax})"
            )
        key, value = token.split("=", 1)
        kwargs[key.strip()] = value.strip()
    return kwargs


def split_semicolon_args(text: str | None) -> dict[str, str]:
    """`k=v;k2=v2`, the one-string form of sd-scripts' gen_img (blank pieces are skipped)."""
    tokens = [t.strip() for t in (text or "").split(";")]
    return split_key_values([t for t in tokens if t], "key=value;key2=value2")


def parse_bool(key: str, value: Any) -> bool | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        v = value.strip().lower()
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
    raise NetworkArgError(
        f"network_args {key}={value!r}: expected a boolean (true/false, 1/0, yes/no, on/off)"
    )


def parse_int(key: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise NetworkArgError(f"network_args {key}={value!r}: expected an integer")
    if isinstance(value, int):
        return value
    try:
        f = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise NetworkArgError(f"network_args {key}={value!r}: expected an integer") from None
    if not f.is_integer():
        raise NetworkArgError(f"network_args {key}={value!r}: expected an integer, got a fraction")
    return int(f)


def parse_float(key: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise NetworkArgError(f"network_args {key}={value!r}: expected a number")
    try:
        return float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise NetworkArgError(f"network_args {key}={value!r}: expected a number") from None


def parse_probability(key: str, value: Any) -> float | None:
    p = parse_float(key, value)
    if p is not None and not 0.0 <= p < 1.0:
        raise NetworkArgError(f"network_args {key}={value!r}: expected a probability in [0, 1)")
    return p


def _compile(key: str, pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise NetworkArgError(f"network_args {key}: regex {pattern!r} does not compile: {e}") from None


def parse_regex_list(key: str, value: Any) -> list[str]:
    """A Python literal list/tuple of str, or one str; an unparsable literal is one regex."""
    if value is None:
        return []
    items: Any = value
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        try:
            items = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            logger.info("network_args %s: %r is not a Python literal; using it as one regex", key, text)
            items = text
    if isinstance(items, str):
        items = [items]
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise NetworkArgError(
            f"network_args {key}={value!r}: expected a list of regex strings, e.g. [r'.*mlp.*']"
        )
    for p in items:
        _compile(key, p)
    return list(items)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_regex_pairs(key: str, value: Any, as_int: bool) -> list[tuple[str, float | int]]:
    """`re=value,re2=value2`: commas inside a regex survive, each pair splits at its LAST `=`.

    A comma-separated piece is only a complete pair once the text after its last `=` is a number,
    so `a{1,3}=4` and `(?=x)y=1e-4` keep their commas and `=` signs.
    """
    if value is None:
        return []
    if isinstance(value, dict):
        pairs_raw = [(str(k), v) for k, v in value.items()]
    else:
        if not isinstance(value, str):
            raise NetworkArgError(f"network_args {key}={value!r}: expected 'regex=value,regex2=value2'")
        pairs_raw = []
        buf: str | None = None
        for piece in value.split(","):
            buf = piece if buf is None else buf + "," + piece
            if "=" in buf and _is_number(buf.rsplit("=", 1)[1].strip()):
                pattern, val = buf.rsplit("=", 1)
                pairs_raw.append((pattern.strip(), val.strip()))
                buf = None
        if buf is not None and buf.strip():
            raise NetworkArgError(
                f"network_args {key}: {buf!r} is not 'regex=number' (expected 'regex=value,regex2=value2')"
            )
    out: list[tuple[str, float | int]] = []
    for pattern, val in pairs_raw:
        if not pattern:
            raise NetworkArgError(f"network_args {key}: empty regex before '={val}'")
        _compile(key, pattern)
        num = parse_int(f"{key} ({pattern})", val) if as_int else parse_float(f"{key} ({pattern})", val)
        assert num is not None
        if as_int and num < 0:
            raise NetworkArgError(f"network_args {key}: rank for {pattern!r} must be >= 0, got {num}")
        out.append((pattern, num))
    return out


def _ratio(key: str, value: Any) -> float | None:
    v = parse_float(key, value)
    if v is not None and v < 0:
        raise NetworkArgError(f"network_args {key}={value!r}: expected a ratio >= 0")
    return v


def _conv_rank(key: str, value: Any) -> int | None:
    """A rank >= 0; 0 means "no conv modules", the same as not given."""
    v = parse_int(key, value)
    if v is not None and v < 0:
        raise NetworkArgError(f"network_args {key}={value!r}: expected a rank >= 0")
    return v or None


def _factor(key: str, value: Any) -> int | None:
    v = parse_int(key, value)
    if v is not None and (v == 0 or v < -1):
        raise NetworkArgError(f"network_args {key}={value!r}: expected -1 (automatic) or a positive integer")
    return v


def _lr_pairs(key: str, value: Any) -> list[tuple[str, float]]:
    return [(p, float(v)) for p, v in parse_regex_pairs(key, value, as_int=False)]


def _rank_pairs(key: str, value: Any) -> list[tuple[str, int]]:
    return [(p, int(v)) for p, v in parse_regex_pairs(key, value, as_int=True)]


_SPEC = "network_arg"


@dataclass(frozen=True)
class _ArgSpec:
    """How one `NetworkArgs` field is read from `--network_args`.

    `keys` are tried in order and the first one whose parsed value is not None wins; a parsed None
    leaves the field at its default. `algos` limits the keys to some algorithms (None = all).
    """

    parse: Callable[[str, Any], Any]
    keys: tuple[str, ...] = ()
    algos: tuple[str, ...] | None = None


def _arg(
    parse: Callable[[str, Any], Any],
    *,
    keys: tuple[str, ...] = (),
    algos: tuple[str, ...] | None = None,
    **field_kwargs: Any,
) -> Any:
    return field(metadata={_SPEC: _ArgSpec(parse, keys, algos)}, **field_kwargs)


@dataclass
class NetworkArgs:
    """All network options after parsing, with their defaults; each option field says how it is parsed."""

    algo: str = "loha"
    verbose: bool = _arg(parse_bool, default=False)
    # sd-scripts passes --network_dropout as `dropout`; `neuron_dropout` is the same option and wins
    dropout: float | None = _arg(parse_probability, keys=("neuron_dropout", "dropout"), default=None)
    rank_dropout: float | None = _arg(parse_probability, default=None)
    module_dropout: float | None = _arg(parse_probability, default=None)
    exclude_patterns: list[str] = _arg(parse_regex_list, default_factory=list)
    include_patterns: list[str] = _arg(parse_regex_list, default_factory=list)
    reg_lrs: list[tuple[str, float]] = _arg(_lr_pairs, keys=("network_reg_lrs",), default_factory=list)
    reg_dims: list[tuple[str, int]] = _arg(_rank_pairs, keys=("network_reg_dims",), default_factory=list)
    conv_dim: int | None = _arg(_conv_rank, default=None)
    conv_alpha: float | None = _arg(parse_float, default=None)  # 1.0 when conv_dim is set (see parse)
    use_tucker: bool = _arg(parse_bool, algos=("loha", "lokr"), default=False)
    use_scalar: bool = _arg(parse_bool, default=False)
    factor: int = _arg(_factor, algos=("lokr",), default=-1)
    decompose_both: bool = _arg(parse_bool, algos=("lokr",), default=False)
    full_matrix: bool = _arg(parse_bool, algos=("lokr",), default=False)
    # LoKr Tucker conv modules are saved with a full 4-D lokr_w2 (what every loader reads) unless this is set
    keep_tucker_file: bool = _arg(parse_bool, algos=("lokr",), default=False)
    # opt-in: x·(W + ΔW)ᵀ as one GEMM (ΔW rounded against W)
    merged_forward: bool = _arg(parse_bool, default=False)
    train_llm_adapter: bool = _arg(parse_bool, default=False)
    loraplus_lr_ratio: float | None = _arg(_ratio, default=None)
    loraplus_unet_lr_ratio: float | None = _arg(_ratio, default=None)
    loraplus_text_encoder_lr_ratio: float | None = _arg(_ratio, default=None)

    @property
    def any_loraplus(self) -> bool:
        return any(
            r
            for r in (
                self.loraplus_lr_ratio,
                self.loraplus_unet_lr_ratio,
                self.loraplus_text_encoder_lr_ratio,
            )
        )


def _option_fields() -> list[tuple[str, _ArgSpec, tuple[str, ...]]]:
    """(field name, spec, its `--network_args` keys) for every option field, in declaration order."""
    out = []
    for f in fields(NetworkArgs):
        spec = f.metadata.get(_SPEC)
        if spec is not None:
            out.append((f.name, spec, spec.keys or (f.name,)))
    return out


_OPTION_FIELDS = _option_fields()

# key -> algorithms that accept it (None = all), derived from the fields above
KNOWN_KEYS: dict[str, tuple[str, ...] | None] = {
    key: spec.algos for _, spec, keys in _OPTION_FIELDS for key in keys
}


def _check_keys(algo: str, kwargs: dict[str, Any]) -> None:
    for key in kwargs:
        if key in LYCORIS_ONLY_KEYS:
            raise NetworkArgError(
                f"network_args {key}: a LyCORIS-only option, not supported here ({LYCORIS_ONLY_KEYS[key]})"
            )
        if key not in KNOWN_KEYS:
            known = ", ".join(sorted(KNOWN_KEYS))
            raise NetworkArgError(
                f"network_args {key}: unknown option for networks.{algo}; known options: {known}"
            )
        allowed = KNOWN_KEYS[key]
        if allowed is not None and algo not in allowed and kwargs[key] is not None:
            raise NetworkArgError(
                f"network_args {key}: only valid for networks.{' / networks.'.join(allowed)}, not networks.{algo}"
            )


def parse_network_args(algo: str, kwargs: dict[str, Any], neuron_dropout: float | None = None) -> NetworkArgs:
    """Validate and convert raw kwargs (str, native or None values) for algorithm `algo`."""
    if algo not in ALGORITHMS:
        raise ValueError(f"algo {algo!r}: expected one of {ALGORITHMS}")
    _check_keys(algo, kwargs)
    if neuron_dropout is not None:
        # The explicit argument wins (sd-scripts injects dropout=--network_dropout as a kwarg too).
        kwargs = {**kwargs, "neuron_dropout": neuron_dropout}
    a = NetworkArgs(algo=algo)
    for name, spec, keys in _OPTION_FIELDS:
        for key in keys:
            value = spec.parse(key, kwargs.get(key))
            if value is not None:
                setattr(a, name, value)
                break
    if a.conv_alpha is None and a.conv_dim is not None:
        a.conv_alpha = 1.0
    return a
