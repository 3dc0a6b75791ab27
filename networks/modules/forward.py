"""The forward paths of an adapter: each row of the table in `networks.paths`, as code.

`networks.paths` decides which row runs; the methods here only compute it. The public `merged_output` /
`fused_output` keep their "None where it does not apply" contract by asking the same predicates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from networks import fp8, paths
from networks.functional.common import compute_dtype, conv_padded_input
from networks.functional.fused_linear import BaseWeight, adapter_linear
from networks.modules.patching import is_patched, original_forward


def node_weight(base: nn.Module, dtype: torch.dtype) -> BaseWeight:
    """The base weight as a fused node takes it: an fp8 layer's (fp8 weight, scale or None), which the node
    dequantizes in forward and backward (no 16-bit copy saved), else the weight in the compute dtype."""
    w = base.weight
    if fp8.is_fp8(w):
        return w, fp8.layer_scale(base)
    return w if w.dtype == dtype else w.to(dtype)


class ForwardMixin:
    """Mixed into AdapterModule; the maths hooks (`branch`, `linear_factors`, `delta_weight_scaled`,
    `factor_node_output`) come from the algorithm classes."""

    out_dim: int
    is_conv: bool
    enabled: bool
    multiplier: float
    org_module: nn.Module

    # ------------------------------------------------------------------ the `branch` row (and `off`)
    def delta_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """m·s·drop(ΔW_raw·x), or None when nothing is to be added (disabled, m = 0, module dropped)."""
        if not self.enabled or self.multiplier == 0.0:
            return None
        # The decision comes from a CPU generator: no GPU sync, same on every rank and on recompute.
        if self.host_dropped():
            return None
        return self.apply_dropout(self.branch(x, self.total_scale(self.multiplier)))

    # ------------------------------------------------------------------ `merged`
    def merged_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """`merged_forward`: the whole layer as x·(W + ΔW)ᵀ + b (or conv(x, W + ΔW) + b), one GEMM/conv instead
        of two, also for grad x. None where the `merged` row does not apply."""
        return self._merged(x) if paths.merged_applies(self) else None

    def _merged(self, x: torch.Tensor) -> torch.Tensor:
        # W + ΔW is formed in fp32 and rounded once to the matmul dtype, so in bf16 ΔW is rounded against W:
        # opt-in only (docs/benchmarks.md has its measured effect). It always rebuilds ΔW, also where the cost
        # model would pick a factored path: merged, the rebuild is the faster one (H100 run 10).
        base = self.org_module
        dw = self.delta_weight_scaled(self.total_scale(self.multiplier)).reshape(base.weight.shape)
        acc = torch.float64 if base.weight.dtype == torch.float64 else torch.float32  # fp32 at least
        w = fp8.dequantized_weight(base, acc) + self.masked_right(dw, paths.step_masked(self)).to(acc)
        if not torch.is_autocast_enabled(x.device.type):
            w = w.to(x.dtype)
        if self.is_conv:
            x, padding = conv_padded_input(x, base)
            return F.conv2d(x, w, base.bias, base.stride, padding, base.dilation, base.groups)
        return F.linear(x, w, base.bias)

    # ------------------------------------------------------------------ `fused_node` / `fused`
    def fused_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """The whole layer, base and branch, as one autograd node (functional/fused_linear.py): grad x is
        accumulated in place instead of written twice and added, and the factors' casts and s run inside the
        node. Exact (the same products as plain autograd). None where neither fused row applies."""
        path = paths.fused_path(self, x)
        return None if path is None else self._fused(x, path == "fused_node")

    def _fused(self, x: torch.Tensor, raw_factors: bool) -> torch.Tensor:
        base = self.org_module
        dtype = compute_dtype(x)
        b = base.bias
        if x.dtype != dtype:
            x = x.to(dtype)
        if b is not None and b.dtype != dtype:
            b = b.to(dtype)
        w = node_weight(base, dtype)
        scale = self.total_scale(self.multiplier)
        if raw_factors:
            return self.factor_node_output(x, w, b, scale)
        down, right = self.linear_factors(x, scale)
        return adapter_linear(x, w, b, down, self.masked_right(right, paths.step_masked(self)))

    def factor_node_output(
        self, x: torch.Tensor, weight: BaseWeight, bias: torch.Tensor | None, scale: float
    ) -> torch.Tensor:
        """The `fused_node` row: the layer as one node fed the raw factors and s (no mask to apply)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ `add_branch` / `branch`
    def add_branch(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + m·s·drop(ΔW_raw·x). On the `add_branch` row the branch's last GEMM accumulates into y (addmm,
        β = 1): no N×O branch tensor is written and read back for a separate add."""
        if paths.branch_path(self, x) == "add_branch":
            down, right = self.linear_factors(x, self.total_scale(self.multiplier))
            right = self.masked_right(right, paths.step_masked(self))
            autocast_on = torch.is_autocast_enabled(y.device.type)
            left = x if down is None else F.linear(x, down if autocast_on else down.to(x.dtype))
            if not autocast_on:  # autocast casts the operands itself
                left, right = left.to(y.dtype), right.to(y.dtype)
            out = torch.addmm(y.reshape(-1, self.out_dim), left.reshape(-1, left.shape[-1]), right.t())
            # not a view (as matmul does for N-d inputs): a view with a `_base` reaching a compiled block
            # from an eager layer (proj_in) makes dynamo guard on the base and compile the block again
            return torch.ops.aten._unsafe_view(out, y.shape)
        d = self.delta_output(x)
        return y if d is None else y + d.to(y.dtype)

    # ------------------------------------------------------------------ the layer
    def layer_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """The layer's whole output when this adapter alone computes it faster than base + branch
        (`merged`, `fused_node`, `fused`); None otherwise."""
        path = paths.layer_path(self, x)
        if path == "merged":
            return self._merged(x)
        if path is None:
            return None
        return self._fused(x, path == "fused_node")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer_output(x)
        if out is not None:
            return out
        base = self.org_module
        y = base(x) if not is_patched(base) else original_forward(base)(x)
        return self.add_branch(x, y)
