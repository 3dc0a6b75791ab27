"""`--network_module networks.lora`: the sd-scripts entry module of the LoRA network.

It exposes what sd-scripts' trainers and weight loaders call (`create_network`,
`create_network_from_weights`, `merge_weights_to_tensor`); the adapter itself is
`networks.modules.lora.LoRAModule`.
"""

from networks.entry_points import sd_scripts_entry_points
from networks.modules.lora import LoRAModule

create_network, create_network_from_weights, merge_weights_to_tensor = sd_scripts_entry_points("lora")

__all__ = ["LoRAModule", "create_network", "create_network_from_weights", "merge_weights_to_tensor"]
