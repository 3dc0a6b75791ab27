"""Per-block strength: a block-weight string turned into one multiplier factor per network module.

SDXL uses the convention of the A1111/Forge block-weight extension, so presets users already have carry over:
12 values `BASE,IN04,IN05,IN07,IN08,MID,OUT00..OUT05` (the blocks that hold attention, which is all a
U-Net-attention LoRA touches) or 20 values `BASE,IN00..IN08,MID,OUT00..OUT08`. BASE is both text encoders,
INnn is the SGM `input_blocks.nn`, MID `middle_block`, OUTnn `output_blocks.nn`. As in that extension, a block
the 12-value form leaves out (IN00-IN03, IN06, OUT06-OUT08: ResNet/conv modules only) gets 0, and a module
outside every block (`time_embed`, `label_emb`, `out`) keeps 1.

Anima: the text encoder, the LLM adapter, then one value per DiT block (`blocks.N`); the embedders and the
final layer, outside the blocks, keep 1.

Pure: names in, numbers out. The factor multiplies the network's multiplier per module, live or merged.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

SDXL_IDS_12 = ("BASE", "IN04", "IN05", "IN07", "IN08", "MID", *(f"OUT{i:02d}" for i in range(6)))
SDXL_IDS_20 = ("BASE", *(f"IN{i:02d}" for i in range(9)), "MID", *(f"OUT{i:02d}" for i in range(9)))
ANIMA_TE, ANIMA_ADAPTER = "TE", "ADAPTER"

_SDXL_UNET = re.compile(r"lora_unet_(?:(input_blocks|output_blocks)_(\d+)|(middle_block))_")
_ANIMA_BLOCK = re.compile(r"lora_unet_blocks_(\d+)_")


class BlockWeightError(ValueError):
    """A block-weight string that cannot be used; the message names the flag and what is expected."""


def sdxl_block_of(lora_name: str) -> str | None:
    """The block ID of an SDXL module name (SGM naming), or None for a module outside every block."""
    if lora_name.startswith("lora_te"):  # lora_te1_ / lora_te2_ (and a single-encoder lora_te_)
        return "BASE"
    m = _SDXL_UNET.match(lora_name)
    if m is None:
        return None
    if m.group(3):
        return "MID"
    return ("IN" if m.group(1) == "input_blocks" else "OUT") + f"{int(m.group(2)):02d}"


def anima_block_of(lora_name: str) -> str | None:
    """The block ID of an Anima module name (sd-scripts naming), or None outside every block."""
    if lora_name.startswith("lora_te"):
        return ANIMA_TE
    if lora_name.startswith("lora_unet_llm_adapter_"):
        return ANIMA_ADAPTER
    m = _ANIMA_BLOCK.match(lora_name)
    return f"B{int(m.group(1)):02d}" if m else None


def anima_block_ids(n_blocks: int) -> tuple[str, ...]:
    return (ANIMA_TE, ANIMA_ADAPTER, *(f"B{i:02d}" for i in range(n_blocks)))


@dataclass(frozen=True)
class BlockWeights:
    """Values for `ids`; a module in a block not in `ids` gets `unlisted`, one outside every block gets 1."""

    ids: tuple[str, ...]
    values: tuple[float, ...]
    block_of: Callable[[str], str | None]
    unlisted: float = 0.0

    def weight_of(self, lora_name: str) -> float:
        block = self.block_of(lora_name)
        if block is None:
            return 1.0
        table = dict(zip(self.ids, self.values))
        return table.get(block, self.unlisted)

    def summary(self, names: Iterable[str]) -> str:
        """One line: weight and module count per block that has modules, in block order."""
        counts: dict[str | None, int] = {}
        for n in names:
            b = self.block_of(n)
            counts[b] = counts.get(b, 0) + 1
        order = list(self.ids) + sorted(b for b in counts if b is not None and b not in self.ids)
        parts = []
        for b in order:
            if counts.get(b):
                w = dict(zip(self.ids, self.values)).get(b, self.unlisted)
                note = "" if b in self.ids else " (not in this form)"
                parts.append(f"{b}×{w:g} ({counts[b]}){note}")
        if counts.get(None):
            parts.append(f"outside the blocks ×1 ({counts[None]})")
        return ", ".join(parts)

    def unlisted_blocks(self, names: Iterable[str]) -> list[str]:
        """Blocks that have modules in `names` but no value in this form (they get `unlisted`)."""
        found = {self.block_of(n) for n in names}
        return sorted(b for b in found if b is not None and b not in self.ids)


def parse_numbers(flag: str, text: str) -> list[float]:
    """Comma-separated numbers (spaces allowed); anything else is an error naming `flag`."""
    parts = [p.strip() for p in text.split(",")]
    values = []
    for p in parts:
        try:
            v = float(p)
        except ValueError:
            raise BlockWeightError(
                f"{flag} {text!r}: {p!r} is not a number (expected comma-separated numbers, e.g. 1,0,0.5,...)"
            ) from None
        if v != v or v in (float("inf"), float("-inf")):
            raise BlockWeightError(f"{flag} {text!r}: {p!r} is not a finite number")
        values.append(v)
    return values


def is_unset(text: str | None) -> bool:
    """An empty string (or none given) means plain strength for that network."""
    return text is None or not text.strip()


def parse_sdxl_block_weights(flag: str, text: str | None) -> BlockWeights | None:
    """12 or 20 values (see the module doc); None for an empty string."""
    if text is None or is_unset(text):
        return None
    values = parse_numbers(flag, text)
    forms = {len(SDXL_IDS_12): SDXL_IDS_12, len(SDXL_IDS_20): SDXL_IDS_20}
    ids = forms.get(len(values))
    if ids is None:
        raise BlockWeightError(
            f"{flag} {text!r}: {len(values)} values; SDXL takes 12 ({','.join(SDXL_IDS_12)}) "
            f"or 20 ({SDXL_IDS_20[0]},IN00..IN08,MID,OUT00..OUT08)"
        )
    return BlockWeights(ids, tuple(values), sdxl_block_of, unlisted=0.0)


def parse_anima_block_weights(flag: str, text: str | None, n_blocks: int) -> BlockWeights | None:
    """Text encoder, LLM adapter, then one value per DiT block (`n_blocks`); None for an empty string."""
    if text is None or is_unset(text):
        return None
    values = parse_numbers(flag, text)
    ids = anima_block_ids(n_blocks)
    if len(values) != len(ids):
        raise BlockWeightError(
            f"{flag} {text!r}: {len(values)} values; this Anima DiT takes {len(ids)}: the text encoder, "
            f"the LLM adapter, then one per DiT block (B00..B{n_blocks - 1:02d})"
        )
    return BlockWeights(ids, tuple(values), anima_block_of, unlisted=0.0)


def per_network(flag: str, texts: list[str] | None, n: int, what: str) -> list[str | None]:
    """One string per network (or none at all): a count mismatch is an error naming `flag`."""
    if texts is None:
        return [None] * n
    if len(texts) != n:
        raise BlockWeightError(
            f"{flag}: {len(texts)} string(s) for {n} {what}; give one per {what.rstrip('s')} "
            '(an empty string "" leaves that one at plain strength)'
        )
    return list(texts)


def sdxl_per_network(
    flag: str, texts: list[str] | None, n: int, what: str = "networks"
) -> list[BlockWeights | None]:
    """One SDXL string per network (or file), each parsed; errors name the flag."""
    return [parse_sdxl_block_weights(flag, t) for t in per_network(flag, texts, n, what)]


def check_anima_syntax(flag: str, texts: list[str] | None, n: int) -> None:
    """What can be checked before the DiT is loaded (its block count fixes the length): count and numbers."""
    for t in per_network(flag, texts, n, "files"):
        if t is not None and not is_unset(t):
            parse_numbers(flag, t)


def anima_per_file(flag: str, texts: list[str] | None, n: int, n_blocks: int) -> list[BlockWeights | None]:
    return [parse_anima_block_weights(flag, t, n_blocks) for t in per_network(flag, texts, n, "files")]


def apply_block_weights(network: Any, weights: BlockWeights, label: str) -> None:
    """Give every module of a live network (ours: `set_block_weights`) its block's factor; log what it did."""
    if not hasattr(network, "set_block_weights"):
        raise BlockWeightError(
            f"{label}: network class {type(network).__name__} has no per-module multipliers "
            "(block weights work with networks.lora / networks.loha / networks.lokr)"
        )
    network.set_block_weights(weights.weight_of)
    names = [m.lora_name for m in network.all_loras]
    logger.info("%s: %s", label, weights.summary(names))
    skipped = weights.unlisted_blocks(names)
    if skipped:
        logger.warning(
            "%s: modules in %s are not in the %d-value form and get %g, as the block-weight extension does; "
            "give 20 values to set them",
            label,
            ", ".join(skipped),
            len(weights.ids),
            weights.unlisted,
        )
