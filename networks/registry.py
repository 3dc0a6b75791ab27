"""The algorithms this package knows: name → adapter module class.

The only place that lists them. The network and the merge code look classes up here; the algorithm
modules under `networks/modules/` know nothing about the network, and the entry modules
(`networks.lora`, `networks.loha`, `networks.lokr`) sit on top of everything.
"""

from __future__ import annotations

from networks.modules.adapter import AdapterModule
from networks.modules.loha import LoHaModule
from networks.modules.lokr import LoKrModule
from networks.modules.lora import LoRAModule
from networks.network_args import ALGORITHMS

MODULE_CLASSES: dict[str, type[AdapterModule]] = {c.algo: c for c in (LoRAModule, LoHaModule, LoKrModule)}
assert tuple(sorted(MODULE_CLASSES)) == tuple(sorted(ALGORITHMS)), "every parsable algorithm has a class"


def module_class_for(algo: str) -> type[AdapterModule]:
    if algo not in MODULE_CLASSES:
        raise ValueError(f"algorithm {algo!r}: expected one of {sorted(MODULE_CLASSES)}")
    return MODULE_CLASSES[algo]
