"""`--network_module networks.lokr`: the sd-scripts entry module of the LoKr network.

It exposes what sd-scripts' trainers and weight loaders call (`create_network`,
`create_network_from_weights`, `merge_weights_to_tensor`); the adapter itself is
`networks.modules.lokr.LoKrModule`.
"""

from networks.entry_points import sd_scripts_entry_points
from networks.modules.lokr import LoKrLayout, LoKrModule, full_w2_count, plan_lokr

create_network, create_network_from_weights, merge_weights_to_tensor = sd_scripts_entry_points("lokr")

__all__ = [
    "LoKrModule",
    "LoKrLayout",
    "full_w2_count",
    "plan_lokr",
    "create_network",
    "create_network_from_weights",
    "merge_weights_to_tensor",
]
