"""Loading a model without a second copy on the host: built on the meta device, then filled tensor by tensor.

Each tensor comes from a `networks.tensor_stream.TensorStream` (plain file reads into one reused staging
buffer), is converted and placed on its device, and is adopted by the module; the host holds only what
stays there, plus one tensor in flight.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from accelerate import init_empty_weights
from torch import nn

from networks.tensor_stream import TensorStream

logger = logging.getLogger(__name__)
Device = str | torch.device
Placement = Callable[[str], Device]  # state-dict key -> device of that tensor
Put = Callable[[str, torch.Tensor, Device], None]  # (key, tensor as read, device)


def cast_one(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`t` in `dtype` when it is a floating-point tensor (integer tensors keep theirs)."""
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def build_empty(build: Callable[[], nn.Module]) -> nn.Module:
    """The module with its parameters on the meta device (no memory); buffers are real (e.g. RoPE tables)."""
    with init_empty_weights(include_buffers=False):
        return build()


def matching(model: nn.Module, names: dict[str, str], what: str, ignore_unexpected: bool = False) -> dict:
    """`names` (model key -> file key) limited to the model's keys; strict with clear errors."""
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(names)), sorted(set(names) - expected)
    if unexpected and ignore_unexpected:
        logger.warning(
            "%s: ignoring %d tensors the model does not use, e.g. %s", what, len(unexpected), unexpected[:3]
        )
        names = {k: v for k, v in names.items() if k in expected}
        unexpected = []
    if missing or unexpected:
        raise ValueError(
            f"{what}: checkpoint does not match the model: missing {missing[:8]}"
            f"{' …' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
            f"{' …' if len(unexpected) > 8 else ''}"
        )
    return names


def assign(model: nn.Module, key: str, t: torch.Tensor) -> None:
    """Adopt `t` as the parameter or buffer `key` (as load_state_dict(assign=True) does)."""
    owner, _, leaf = key.rpartition(".")
    mod = model.get_submodule(owner)
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(t, requires_grad=mod._parameters[leaf].requires_grad)
    else:
        mod._buffers[leaf] = t


def settle(stream: TensorStream, t: torch.Tensor, dtype: torch.dtype | None, device: Device) -> torch.Tensor:
    """`t` cast to `dtype` on `device`, with memory of its own (copied out of the stream's staging buffer).
    For another device the cast runs there: a host copy freed right after would stay resident as a heap hole."""
    if torch.device(device).type != "cpu":
        return cast_one(t.to(device), dtype)
    out = cast_one(t, dtype)
    return out.clone() if stream.is_staged(out) else out


def stream_into(
    model: nn.Module, stream: TensorStream, names: dict[str, str], place: Placement, put: Put
) -> None:
    """Read every file tensor named in `names` (model key -> file key) once, in file order, into the stream's
    staging buffer, and hand it to `put` (which settles it); then move the built-in buffers (those no file
    holds) where `place` says."""
    by_file = {v: k for k, v in names.items()}
    for file_key, t in stream.items(by_file, staged=True):
        key = by_file[file_key]
        put(key, t, place(key))
    for owner, mod in model.named_modules():
        for leaf, b in mod._buffers.items():
            if b is not None and b.device.type != "meta":
                mod._buffers[leaf] = b.to(place(f"{owner}.{leaf}" if owner else leaf))


def load_streamed(
    build: Callable[[], nn.Module],
    stream: TensorStream,
    names: dict[str, str],
    what: str,
    dtype: torch.dtype | None,
    device: Device,
    ignore_unexpected: bool = False,
) -> nn.Module:
    """Build on the meta device, then read each tensor into `dtype` on `device`; frozen, eval."""
    model = build_empty(build)
    names = matching(model, names, what, ignore_unexpected)
    stream_into(
        model,
        stream,
        names,
        lambda _k: device,
        lambda k, t, dev: assign(model, k, settle(stream, t, dtype, dev)),
    )
    return model.eval().requires_grad_(False)
