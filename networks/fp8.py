"""fp8 base weights (`--fp8_base`, `--fp8_scaled`) for both architectures, and fp8 checkpoints.

A converted nn.Linear / nn.Conv2d keeps its class; only its weight is stored as float8_e4m3fn (norms,
embeddings and biases keep their dtype). `--fp8_scaled` adds a float32 buffer ``scale_weight`` of shape
(out, 1[, 1, 1]): the weight is ``fp8 × scale`` with one scale per output channel, chosen so the channel's
largest magnitude lands on e4m3's largest value (448), which keeps small weights out of the subnormal range
where e4m3 has almost no precision (docs/benchmarks.md, "fp8 base"). The forward upcasts the weight to the
compute dtype (the autocast dtype, else the input's) and multiplies by the scale there: no fp8 matmul is
needed, so it runs on every device, and the adapters' maths (fp32, exact) is untouched.

Checkpoints already in fp8 load through `unpack_fp8_state_dict`: plain fp8 weights, and scaled ones under
either key convention (``<layer>.scale_weight`` with an optional ``scaled_fp8`` marker, or
``<layer>.weight_scale`` with ``<layer>.comfy_quant``); input scales are for fp8 matmuls and not needed here.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from networks.kernels import fp8_dequant

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
SCALE_NAME = "scale_weight"
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# checkpoint keys that describe fp8 storage (not model tensors)
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
_DROPPED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
_MARKER = "scaled_fp8"

# (fp8 weight, scale broadcastable to it or None) of one layer
Packed = tuple[torch.Tensor, torch.Tensor | None]


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype in _FP8_DTYPES


def is_fp8_layer(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return isinstance(w, torch.Tensor) and is_fp8(w)


# ------------------------------------------------------------------------------------------------ maths
def quantize(
    w: torch.Tensor, scaled: bool, scratch: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> Packed:
    """float weight -> (e4m3 weight, per-output-channel float32 scale of shape (out, 1, ...) or None).

    Values beyond ±448 saturate (e4m3fn has no infinity; an unclamped cast would give NaN). A channel that
    is all zero gets scale 1. The maths runs in place in one float32 copy of `w`, made in `scratch` (a
    float32 buffer of at least `w.numel()` elements) when given, and the result lands in `out` (an e4m3
    buffer as large) when given: a loader quantizing weight after weight then allocates only what it keeps."""
    n = w.numel()
    w32 = (
        torch.empty(w.shape, dtype=torch.float32, device=w.device)
        if scratch is None
        else scratch[:n].view(w.shape)
    )
    w32.copy_(w.detach())
    scale = None
    if scaled:
        rows = w32.reshape(w32.shape[0], -1)
        amax = torch.maximum(rows.amax(dim=1), rows.amin(dim=1).neg())  # max |w| per row, no |w| copy
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        scale = scale.reshape(-1, *([1] * (w32.dim() - 1)))
        w32.div_(scale)
    w32.clamp_(-FP8_MAX, FP8_MAX)
    return (w32.to(FP8_DTYPE) if out is None else out[:n].view(w.shape).copy_(w32)), scale


def dequantize(w8: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """fp8 × scale in `dtype` (a fresh tensor: the scale multiplies it in place). On GPUs with native fp8
    conversions one Triton pass gives the same bits (`networks.kernels.fp8_dequant`)."""
    if fp8_dequant.usable(w8, scale, dtype):
        return fp8_dequant.dequantize(w8, scale, dtype)
    w = w8.to(dtype)
    return w if scale is None else w.mul_(scale.to(dtype))


def layer_scale(module: nn.Module) -> torch.Tensor | None:
    # read from the buffer table: getattr's miss on a layer without a scale goes through Module.__getattr__'s
    # AttributeError, a µs per call on every fp8 layer, three times a step
    return module._buffers.get(SCALE_NAME)


def dequantized_weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The weight a converted layer computes with, in `dtype` (any layer: a float weight is just cast)."""
    if not is_fp8_layer(module):
        return module.weight.to(dtype)
    return dequantize(module.weight, layer_scale(module), dtype)


def forward_dtype(x: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on, else the input's (fp32 for integer or 8-bit inputs)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype if x.dtype.is_floating_point and x.dtype.itemsize > 1 else torch.float32


class _Fp8Linear(torch.autograd.Function):
    """y = x·(fp8 × scale)ᵀ + b that saves the fp8 weight for backward, not its upcast copy (a saved
    16-bit copy per layer would undo the memory fp8 saves when the activations are kept)."""

    @staticmethod
    def forward(ctx, x, w8, scale, bias):  # type: ignore[override]
        ctx.save_for_backward(w8, scale)
        return F.linear(x, dequantize(w8, scale, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        w8, scale = ctx.saved_tensors
        grad_x = grad_y @ dequantize(w8, scale, grad_y.dtype) if ctx.needs_input_grad[0] else None
        grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if ctx.needs_input_grad[3] else None
        return grad_x, None, None, grad_b


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    dtype = forward_dtype(x)
    bias = self.bias
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    if x.dtype != dtype:
        x = x.to(dtype)
    scale = layer_scale(self)
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _Fp8Linear.apply(x, self.weight, scale, bias)
    # nothing to differentiate: the node's forward without the node (a custom Function costs host time)
    return F.linear(x, dequantize(self.weight, scale, dtype), bias)


def _conv_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    dtype = forward_dtype(x)
    bias = self.bias
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    return self._conv_forward(x if x.dtype == dtype else x.to(dtype), dequantized_weight(self, dtype), bias)


def has_fp8_forward(module: nn.Module) -> bool:
    """Whether the layer's own forward is the upcasting one `set_fp8_weight` installed: the class's maths on
    the dequantized weight, so an adapter computing the whole layer (networks.paths) may stand in for it."""
    forward = module.__dict__.get("forward")
    return getattr(forward, "__func__", None) in (_linear_forward, _conv_forward)


# ------------------------------------------------------------------------------------------- conversion
def set_fp8_weight(module: nn.Module, w8: torch.Tensor, scale: torch.Tensor | None) -> None:
    """Store (w8, scale) as the layer's weight and route its forward through the upcasting one."""
    module.weight = nn.Parameter(w8, requires_grad=False)
    if SCALE_NAME in module._buffers or scale is not None:
        module.register_buffer(SCALE_NAME, None if scale is None else scale.float())
    forward = _conv_forward if isinstance(module, nn.Conv2d) else _linear_forward
    module.forward = types.MethodType(forward, module)


def apply_fp8_base(
    model: nn.Module,
    scaled: bool = False,
    include: Callable[[str], bool] | None = None,
    stored: dict[str, Packed] | None = None,
) -> int:
    """Convert the Linear/Conv2d weights of `model` (those whose qualified name `include` accepts) to fp8
    in place; returns how many were converted.

    `stored`: layers whose checkpoint was already fp8 (from `unpack_fp8_state_dict`) keep those exact values
    and scales instead of being quantized again from their dequantized copy."""
    stored = stored or {}
    layers = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear | nn.Conv2d)
        and (include is None or include(name))
        and not is_fp8_layer(module)
    ]
    # one float32 scratch per device for all layers: a fresh one per layer, freed after, leaves holes in a
    # host heap that the process keeps resident
    largest: dict[torch.device, int] = {}
    for name, module in layers:
        if name in stored:  # kept as stored, nothing to quantize
            continue
        w = module.weight
        largest[w.device] = max(largest.get(w.device, 0), w.numel())
    scratch = {dev: torch.empty(n, dtype=torch.float32, device=dev) for dev, n in largest.items()}
    count = 0
    for name, module in layers:
        packed = stored.get(name)
        if packed is None:
            packed = quantize(module.weight, scaled, scratch[module.weight.device])
        w8, scale = packed
        set_fp8_weight(module, w8.to(module.weight.device), None if scale is None else scale.to(w8.device))
        count += 1
    return count


@torch.no_grad()
def store_weight(module: nn.Module, w: torch.Tensor) -> None:
    """Write a float weight into a converted layer (merging a network into it): quantized again, with a
    fresh per-channel scale when the layer has one."""
    scaled = layer_scale(module) is not None
    w8, scale = quantize(w, scaled)
    module.weight.data = w8.to(module.weight.device)
    if scaled:
        module._buffers[SCALE_NAME] = scale.to(module.weight.device)


def cast_keeping_fp8(
    model: nn.Module, device: torch.device | str, dtype: torch.dtype, skip: Iterable[nn.Module] = ()
) -> nn.Module:
    """`model.to(device, dtype)` except that fp8 weights and their float32 scales keep their dtype
    (Module.to would upcast them: fp8 counts as floating point); submodules in `skip` are left alone."""
    skipped = {id(m) for s in skip for m in s.modules()}
    for module in model.modules():
        if id(module) in skipped:
            continue
        for p in module._parameters.values():
            if p is not None:
                keep = is_fp8(p) or not p.is_floating_point()
                p.data = p.data.to(device) if keep else p.data.to(device, dtype)
        for name, b in module._buffers.items():
            if b is not None:
                keep = is_fp8(b) or not b.is_floating_point() or name == SCALE_NAME
                module._buffers[name] = b.to(device) if keep else b.to(device, dtype)
    return model


# ------------------------------------------------------------------------------------------- checkpoints
def _broadcast_scale(scale: torch.Tensor, weight: torch.Tensor, key: str) -> torch.Tensor | None:
    """A stored scale as (out, 1, ...) or [1]*dim; None for a block-wise one (dequantized instead)."""
    s = scale.float()
    if s.numel() == 1:
        return s.reshape([1] * weight.dim())
    if s.numel() == weight.shape[0]:
        return s.reshape(-1, *([1] * (weight.dim() - 1)))
    if (
        s.dim() == 3
        and s.shape[0] == weight.shape[0]
        and weight.dim() == 2
        and weight.shape[1] % s.shape[1] == 0
    ):
        return None
    raise ValueError(
        f"{key}: fp8 scale of shape {tuple(s.shape)} does not fit weight {tuple(weight.shape)} "
        "(expected one value, one per output channel, or (out, blocks, 1))"
    )


def is_storage_key(key: str) -> bool:
    """Whether a checkpoint key describes fp8 storage (a scale, input scale or marker), not a model tensor."""
    return key == _MARKER or key.endswith("." + _MARKER) or key.endswith(_SCALE_SUFFIXES + _DROPPED_SUFFIXES)


def scale_layer(key: str) -> str | None:
    """The layer whose weight scale the checkpoint key `key` holds, else None."""
    for s in _SCALE_SUFFIXES:
        if key.endswith(s):
            return key[: -len(s)]
    return None


def unpack_fp8_tensor(
    key: str, t: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, Packed | None]:
    """One checkpoint tensor: (`t` itself when it is not fp8, else its dequantized value in `dtype`;
    (fp8 weight, broadcast scale or None) when `key` is a layer weight stored with one scale per tensor or
    per output channel, or with none). `scale` is the layer's stored scale, if any."""
    if not is_fp8(t):
        return t, None
    layer = key[: -len(".weight")] if key.endswith(".weight") else None
    if scale is None or layer is None:
        return t.to(dtype), None if layer is None else (t, None)
    s = _broadcast_scale(scale, t, key)
    if s is None:  # block-wise: (out, blocks, 1) over the input dimension
        blocks = scale.shape[1]
        w = t.float().reshape(t.shape[0], blocks, -1) * scale.float()
        return w.reshape(t.shape).to(dtype), None
    return dequantize(t, s, torch.float32).to(dtype), (t, s)


def unpack_fp8_state_dict(
    sd: dict[str, torch.Tensor], dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], dict[str, Packed]]:
    """Split a checkpoint into plain tensors and fp8 layers.

    Returns (state dict with every fp8 weight dequantized to `dtype` and the storage keys removed,
    {layer name: (fp8 weight, scale or None)} for the layers stored as fp8 with one scale per tensor or per
    output channel). Block-wise scaled layers are dequantized only."""
    scales = {layer: v for k, v in sd.items() if (layer := scale_layer(k)) is not None}
    out: dict[str, torch.Tensor] = {}
    packed: dict[str, Packed] = {}
    for key, t in sd.items():
        if is_storage_key(key):
            continue
        layer = key[: -len(".weight")] if key.endswith(".weight") else None
        out[key], p = unpack_fp8_tensor(key, t, None if layer is None else scales.get(layer), dtype)
        if p is not None and layer is not None:
            packed[layer] = p
    return out, packed


def pack_fp8_state_dict(sd: dict[str, torch.Tensor], scaled: bool, include: Callable[[str], bool]) -> dict:
    """The inverse layout: every 2-D+ ``<layer>.weight`` that `include(layer)` accepts stored as e4m3 (with
    ``<layer>.scale_weight`` of shape (out, 1) when `scaled`); used to write fp8 checkpoints."""
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        layer = key[: -len(".weight")]
        if key.endswith(".weight") and t.dim() >= 2 and t.is_floating_point() and include(layer):
            w8, scale = quantize(t, scaled)
            out[key] = w8
            if scale is not None:
                out[layer + ".scale_weight"] = scale
        else:
            out[key] = t
    return out
