"""`--network_module networks.loha`: the sd-scripts entry module of the LoHa network.

It exposes what sd-scripts' trainers and weight loaders call (`create_network`,
`create_network_from_weights`, `merge_weights_to_tensor`); the adapter itself is
`networks.modules.loha.LoHaModule`.
"""

from networks.entry_points import sd_scripts_entry_points
from networks.modules.loha import LoHaModule

create_network, create_network_from_weights, merge_weights_to_tensor = sd_scripts_entry_points("loha")

__all__ = ["LoHaModule", "create_network", "create_network_from_weights", "merge_weights_to_tensor"]
