"""A Linear layer and its adapter branch as one autograd node (spec networks.md §6 rule 4).

y = x·Wᵀ + b + L·Uᵀ with L = x·Dᵀ (LoRA: D = down, U = s·up) or L = x (a rebuilt ΔW: U = s·ΔW).

Plain autograd of `base(x) + branch(x)` writes grad x twice and adds them (one extra N×I pass per
layer), keeps ~10 autograd nodes per layer, and for LoRA saves nothing useful for backward. Here the
branch GEMM accumulates into the base output (addmm, β = 1) and, in backward, the branch's grad x
accumulates into the base's grad x the same way; LoRA saves its N×r product L instead of recomputing it.
Every term is the same product as in plain autograd, so results match it to rounding (fp64-exact).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class AdapterLinear(torch.autograd.Function):
    """See the module docstring. All tensor inputs share one dtype (the caller casts)."""

    @staticmethod
    def forward(ctx, x, weight, bias, down, up):  # type: ignore[override]
        y = F.linear(x, weight, bias)
        x2 = x.reshape(-1, x.shape[-1])
        left = x2 if down is None else x2 @ down.t()
        y.view(-1, y.shape[-1]).addmm_(left, up.t())
        ctx.has_down = down is not None
        ctx.x_shape = x.shape
        # L is x itself for a rebuilt ΔW; LoRA keeps its thin N×r product for grad up
        ctx.save_for_backward(x2, weight, down, up, left if down is not None else None)
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x2, weight, down, up, left = ctx.saved_tensors
        if left is None:
            left = x2
        need_x, need_w, need_b, need_down, need_up = ctx.needs_input_grad
        g2 = grad_y.reshape(-1, grad_y.shape[-1])
        gx = gw = gb = gdown = gup = None
        # grad of L: g·U (N×r for LoRA); for a rebuilt ΔW it feeds grad x directly
        g_left = g2 @ up if ctx.has_down and (need_x or need_down) else None
        if need_x:
            gx = g2 @ weight
            if ctx.has_down:
                gx.addmm_(g_left, down)
            else:
                gx.addmm_(g2, up)
            gx = gx.view(ctx.x_shape)
        if need_w:
            gw = g2.t() @ x2
        if need_b:
            gb = g2.sum(0)
        if need_up:
            gup = g2.t() @ left
        if need_down:
            gdown = g_left.t() @ x2
        return gx, gw, gb, gdown, gup


def adapter_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    down: torch.Tensor | None,
    up: torch.Tensor,
) -> torch.Tensor:
    """x·Wᵀ + b + (x·Dᵀ)·Uᵀ, or x·Wᵀ + b + x·Uᵀ with `down` None; one autograd node.

    x (..., I), weight (O, I), bias (O,) or None, down (r, I) or None, up (O, r) or (O, I) without down.
    """
    in_dim = weight.shape[1]
    inner = in_dim if down is None else down.shape[0]
    if (
        x.shape[-1] != in_dim
        or up.shape != (weight.shape[0], inner)
        or (down is not None and down.shape[1] != in_dim)
    ):
        raise ValueError(
            f"adapter_linear: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
            f"down {None if down is None else tuple(down.shape)}, up {tuple(up.shape)} do not fit; expected "
            "x (..., I), weight (O, I), down (r, I) with up (O, r), or no down with up (O, I)"
        )
    return AdapterLinear.apply(x, weight, bias, down, up)


class MergedLoRALinear(torch.autograd.Function):
    """`merged_forward` for LoRA: y = x·W'ᵀ + b with W' = W + U·D accumulated in fp32, rounded once to x's dtype.

    Plain autograd of F.linear(x, W') would compute grad W' = gᵀ·x, a GEMM as large as the base one, and
    then project it onto the factors. Here the factors' grads come from thin products instead:
    grad U = gᵀ·(x·Dᵀ), grad D = (g·U)ᵀ·x, and grad x = g·W' (one GEMM for base and branch).
    All products run in x's dtype (the factors cast to it, as autocast does); grads come back in the factors'
    dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, down, up):  # type: ignore[override]
        # One GEMM with W as its C input: U·D accumulates in fp32 and is added to W in the epilogue, rounded
        # once. Forming W + U·D in fp32 tensors instead moves ~20 bytes per weight element; summed over
        # SDXL's 2.2e9 adapted weights, twice a step (forward and recompute), that was the merged path's
        # largest cost.
        w_eff = torch.addmm(weight.to(x.dtype), up.to(x.dtype), down.to(x.dtype))
        ctx.save_for_backward(x, w_eff, down, up)
        return F.linear(x, w_eff, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x, w_eff, down, up = ctx.saved_tensors
        need_x, _, need_b, need_down, need_up = (
            ctx.needs_input_grad
        )  # the weight is frozen (checked on entry)
        g2 = grad_y.reshape(-1, grad_y.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        gx = gb = gdown = gup = None
        if need_x:
            gx = (g2 @ w_eff).view(x.shape)
        if need_b:
            gb = g2.sum(0)
        if need_up:
            h = x2 @ down.to(x.dtype).t()  # N×r, recomputed: cheaper than keeping it through the forward
            gup = (g2.t() @ h).to(up.dtype)
        if need_down:
            gdown = ((g2 @ up.to(g2.dtype)).t() @ x2).to(down.dtype)
        return gx, None, gb, gdown, gup


def merged_lora_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor, up: torch.Tensor
) -> torch.Tensor:
    """x·(W + up·down)ᵀ + b as one GEMM, with the factors' grads from thin products. The base weight is frozen."""
    if weight.requires_grad:
        raise ValueError("merged_lora_linear: the base weight must be frozen (requires_grad False)")
    if (
        down.dim() != 2
        or up.dim() != 2
        or up.shape[1] != down.shape[0]
        or (up.shape[0], down.shape[1]) != tuple(weight.shape)
    ):
        raise ValueError(
            f"merged_lora_linear: weight {tuple(weight.shape)}, down {tuple(down.shape)}, up {tuple(up.shape)}; "
            "expected down (r, I) and up (O, r) with weight (O, I)"
        )
    return MergedLoRALinear.apply(x, weight, bias, down, up)
