"""Parsing of `--network_args` for the LoRA / LoHa / LoKr networks.

Values reach `create_network` as strings (sd-scripts' trainer splits each token at the first `=`),
as native Python values (callers in code) or as None (= not given), so every converter accepts all three.
"""

from __future__ import annotations

import ast
import logging
import re
from dataclasses import dataclass, field
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

# key -> algorithms that accept it (None = all)
KNOWN_KEYS: dict[str, tuple[str, ...] | None] = {
    "verbose": None,
    "dropout": None,
    "neuron_dropout": None,
    "rank_dropout": None,
    "module_dropout": None,
    "exclude_patterns": None,
    "include_patterns": None,
    "network_reg_lrs": None,
    "network_reg_dims": None,
    "conv_dim": None,
    "conv_alpha": None,
    "use_tucker": ("loha", "lokr"),
    "use_scalar": None,
    "factor": ("lokr",),
    "decompose_both": ("lokr",),
    "full_matrix": ("lokr",),
    "keep_tucker_file": ("lokr",),
    "merged_forward": None,
    "train_llm_adapter": None,
    "loraplus_lr_ratio": None,
    "loraplus_unet_lr_ratio": None,
    "loraplus_text_encoder_lr_ratio": None,
}

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class NetworkArgError(ValueError):
    """A `--network_args` value is missing, unknown or malformed (the message names the key)."""


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


@dataclass
class NetworkArgs:
    """All network options after parsing, with their defaults."""

    algo: str = "loha"
    verbose: bool = False
    dropout: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    exclude_patterns: list[str] = field(default_factory=list)
    include_patterns: list[str] = field(default_factory=list)
    reg_lrs: list[tuple[str, float]] = field(default_factory=list)
    reg_dims: list[tuple[str, int]] = field(default_factory=list)
    conv_dim: int | None = None
    conv_alpha: float | None = None
    use_tucker: bool = False
    use_scalar: bool = False
    factor: int = -1
    decompose_both: bool = False
    full_matrix: bool = False
    # LoKr Tucker conv modules are saved with a full 4-D lokr_w2 (what every loader reads) unless this is set
    keep_tucker_file: bool = False
    merged_forward: bool = False  # opt-in: x·(W + ΔW)ᵀ as one GEMM (ΔW rounded against W)
    train_llm_adapter: bool = False
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None

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


def parse_network_args(algo: str, kwargs: dict[str, Any], neuron_dropout: float | None = None) -> NetworkArgs:
    """Validate and convert raw kwargs (str, native or None values) for algorithm `algo`."""
    if algo not in ALGORITHMS:
        raise ValueError(f"algo {algo!r}: expected one of {ALGORITHMS}")
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
    g = kwargs.get
    a = NetworkArgs(algo=algo)
    a.verbose = bool(parse_bool("verbose", g("verbose")))
    # The explicit argument wins when given (sd-scripts injects dropout=--network_dropout as a kwarg too).
    drop = neuron_dropout
    if drop is None:
        drop = parse_probability("neuron_dropout", g("neuron_dropout"))
    if drop is None:
        drop = parse_probability("dropout", g("dropout"))
    a.dropout = parse_probability("neuron_dropout", drop)
    a.rank_dropout = parse_probability("rank_dropout", g("rank_dropout"))
    a.module_dropout = parse_probability("module_dropout", g("module_dropout"))
    a.exclude_patterns = parse_regex_list("exclude_patterns", g("exclude_patterns"))
    a.include_patterns = parse_regex_list("include_patterns", g("include_patterns"))
    a.reg_lrs = [
        (p, float(v)) for p, v in parse_regex_pairs("network_reg_lrs", g("network_reg_lrs"), as_int=False)
    ]
    a.reg_dims = [
        (p, int(v)) for p, v in parse_regex_pairs("network_reg_dims", g("network_reg_dims"), as_int=True)
    ]
    a.conv_dim = parse_int("conv_dim", g("conv_dim"))
    if a.conv_dim is not None and a.conv_dim < 0:
        raise NetworkArgError(f"network_args conv_dim={g('conv_dim')!r}: expected a rank >= 0")
    if a.conv_dim == 0:
        a.conv_dim = None
    a.conv_alpha = parse_float("conv_alpha", g("conv_alpha"))
    if a.conv_alpha is None and a.conv_dim is not None:
        a.conv_alpha = 1.0
    a.use_tucker = bool(parse_bool("use_tucker", g("use_tucker")))
    a.use_scalar = bool(parse_bool("use_scalar", g("use_scalar")))
    factor = parse_int("factor", g("factor"))
    a.factor = -1 if factor is None else factor
    if a.factor == 0 or a.factor < -1:
        raise NetworkArgError(
            f"network_args factor={g('factor')!r}: expected -1 (automatic) or a positive integer"
        )
    a.decompose_both = bool(parse_bool("decompose_both", g("decompose_both")))
    a.full_matrix = bool(parse_bool("full_matrix", g("full_matrix")))
    a.keep_tucker_file = bool(parse_bool("keep_tucker_file", g("keep_tucker_file")))
    a.merged_forward = bool(parse_bool("merged_forward", g("merged_forward")))
    a.train_llm_adapter = bool(parse_bool("train_llm_adapter", g("train_llm_adapter")))
    for k in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
        v = parse_float(k, g(k))
        if v is not None and v < 0:
            raise NetworkArgError(f"network_args {k}={g(k)!r}: expected a ratio >= 0")
        setattr(a, k, v)
    return a
