"""The module-level functions of sd-scripts' network contract, made once for each algorithm.

`networks.lora`, `networks.loha` and `networks.lokr` each expose `create_network`,
`create_network_from_weights` and `merge_weights_to_tensor`; they differ only in the algorithm that a
new module gets, so they are built here from the algorithm's name.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from networks.merge import merge_weights_to_tensor_for
from networks.network_base import AdapterNetwork, create_network_for, create_network_from_weights_for


def sd_scripts_entry_points(algo: str) -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
    """`(create_network, create_network_from_weights, merge_weights_to_tensor)` for `algo`."""

    def create_network(
        multiplier: float,
        network_dim: int | None,
        network_alpha: float | None,
        vae: Any,
        text_encoder: Any,
        unet: Any,
        neuron_dropout: float | None = None,
        **kwargs: Any,
    ) -> AdapterNetwork:
        """Build an unapplied network of `algo` adapters for the targets of `unet` and `text_encoder`."""
        return create_network_for(
            algo, multiplier, network_dim, network_alpha, text_encoder, unet, neuron_dropout, kwargs
        )

    def create_network_from_weights(
        multiplier: float,
        file: str | None,
        vae: Any,
        text_encoder: Any,
        unet: Any,
        weights_sd: dict[str, torch.Tensor] | None = None,
        for_inference: bool = False,
        **kwargs: Any,
    ) -> tuple[AdapterNetwork, dict[str, torch.Tensor]]:
        """Build a network whose modules, ranks and layouts come from a file's tensors (values not loaded)."""
        return create_network_from_weights_for(
            algo, multiplier, file, text_encoder, unet, weights_sd, for_inference, kwargs
        )

    # (model_weight, lora_name, lora_sd, lora_weight_keys, multiplier, calc_device): see networks.merge
    merge_weights_to_tensor = functools.partial(merge_weights_to_tensor_for, algo)

    return create_network, create_network_from_weights, merge_weights_to_tensor
