"""Patching a layer's forward so it adds its adapters' branches.

Several adapters may patch one layer (e.g. two networks at once): each layer keeps a list, so they stack
and unwind in any order, and the last one out restores the original forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from networks.fp8 import has_fp8_forward

AdapterModule = (
    Any  # an adapter: `layer_output(x)`, `add_branch(x, y)`, `lora_name` (networks.modules.adapter)
)

_STACK_ATTR = "_lohakr_adapters"
_ORIG_ATTR = "_lohakr_orig_forward"
_HAD_ATTR = "_lohakr_had_instance_forward"


def is_patched(leaf: nn.Module) -> bool:
    return _STACK_ATTR in leaf.__dict__


def original_forward(leaf: nn.Module) -> Any:
    return leaf.__dict__[_ORIG_ATTR]


def attach_adapter(leaf: nn.Module, adapter: AdapterModule) -> None:
    """Patch `leaf.forward` (once per leaf) so it adds every attached adapter's branch."""
    if not is_patched(leaf):
        stack: list[AdapterModule] = []
        had_instance_forward = "forward" in leaf.__dict__
        orig = leaf.forward
        # an instance-level forward set by someone else may do more than the class's: keep calling it; fp8's
        # upcasting forward is the class's maths on the dequantized weight, which the adapter's nodes compute
        plain_forward = not had_instance_forward or has_fp8_forward(leaf)

        def patched_forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if len(stack) == 1 and plain_forward and not args and not kwargs:
                out = stack[0].layer_output(x)  # merged or fused: replaces the base call
                if out is not None:
                    return out
            y = orig(x, *args, **kwargs)
            for a in stack:
                y = a.add_branch(x, y)
            return y

        leaf.__dict__[_STACK_ATTR] = stack
        leaf.__dict__[_ORIG_ATTR] = orig
        leaf.__dict__[_HAD_ATTR] = had_instance_forward
        leaf.forward = patched_forward  # type: ignore[method-assign]
    stack = leaf.__dict__[_STACK_ATTR]
    if any(a is adapter for a in stack):
        raise RuntimeError(f"{adapter.lora_name}: already applied to this layer")
    stack.append(adapter)


def detach_adapter(leaf: nn.Module, adapter: AdapterModule) -> None:
    """Remove one adapter; the last one out restores the layer's original forward."""
    if not is_patched(leaf):
        return
    stack = leaf.__dict__[_STACK_ATTR]
    for i, a in enumerate(stack):
        if a is adapter:
            del stack[i]
            break
    if not stack:
        orig = leaf.__dict__.pop(_ORIG_ATTR)
        had = leaf.__dict__.pop(_HAD_ATTR)
        del leaf.__dict__[_STACK_ATTR]
        if had:
            leaf.forward = orig  # type: ignore[method-assign]
        else:
            del leaf.__dict__["forward"]
