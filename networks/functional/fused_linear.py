"""A Linear layer and its adapter branch as one autograd node (the `fused*` rows of networks.paths).

y = x·Wᵀ + b + s·L·Uᵀ with L = x·Dᵀ (LoRA: D = down, U = up) or L = x (a rebuilt ΔW: U = ΔW, s = 1), and
y = x·Wᵀ + b + x·ΔWᵀ with ΔW built from its factors inside the node (`rebuild_linear`, LoHa and LoKr).

Plain autograd of `base(x) + branch(x)` writes grad x twice and adds them (one extra N×I pass per
layer), keeps ~10 autograd nodes per layer, and for LoRA saves nothing useful for backward. Here the
branch GEMM accumulates into the base output (addmm, β = 1) and, in backward, the branch's grad x
accumulates into the base's grad x the same way; LoRA saves its N×r product L instead of recomputing it.

The factors come in their own dtype (fp32 parameters) with s as a Python float: the casts to the compute
dtype, with s folded into one of them, and the casts of their grads back run inside the node. Where a rule
has a raw build (DeltaRule.raw_build: LoHa's and full LoKr's Triton kernels) the forward casts run inside its
kernel, which writes the same casts and ΔW bit for bit in one launch. In eager mode
each autograd op costs host time (dispatch, an autograd node, a launch), and SDXL has ~800 adapted layers
run twice a step under gradient checkpointing, so the branch is one node instead of five to twelve.
Every term is the same product as in plain autograd, so results match it to rounding (fp64-exact).

The base weight is a tensor in the compute dtype, or an fp8 base's (fp8 weight, scale or None) pair
(networks/fp8.py): the node saves the fp8 weight and dequantizes it for the base GEMM in forward and again
for grad x in backward, as fp8's own node does, so no 16-bit copy of W is kept between the two.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from networks import fp8

Tensor = torch.Tensor
# a frozen base weight as the nodes take it: a tensor in the compute dtype, or (fp8 weight, its scale or None)
BaseWeight = Tensor | fp8.Packed


def split_base_weight(weight: BaseWeight, caller: str) -> tuple[Tensor, Tensor | None]:
    """(weight, fp8 scale or None); a scale only comes with an fp8 weight."""
    w, w_scale = weight if isinstance(weight, tuple) else (weight, None)
    if w_scale is not None and not fp8.is_fp8(w):
        raise ValueError(f"{caller}: a weight scale comes only with an fp8 weight, got a {w.dtype} weight")
    return w, w_scale


def base_weight(w: Tensor, w_scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The base weight for one GEMM in `dtype`: an fp8 weight dequantized (a transient tensor, never saved),
    any other as given (already in the compute dtype)."""
    return fp8.dequantize(w, w_scale, dtype) if fp8.is_fp8(w) else w


def cast_scaled(t: Tensor, dtype: torch.dtype, scale: float = 1.0) -> Tensor:
    """t·scale in `dtype` as one kernel (the multiply writes the cast result); no kernel for a plain cast of a
    tensor already in `dtype`."""
    if scale == 1.0:
        return t if t.dtype == dtype else t.to(dtype)
    return torch.mul(t, scale, out=torch.empty(t.shape, dtype=dtype, device=t.device))


class AdapterLinear(torch.autograd.Function):
    """See the module docstring. x, weight and bias share one dtype (the caller casts; an fp8 weight with its
    scale `w_scale` is dequantized inside); down and up may be in another (they are cast inside, and their
    grads come back in it)."""

    @staticmethod
    def forward(ctx, x, weight, w_scale, bias, down, up, scale):  # type: ignore[override]
        dtype = x.dtype
        ctx.down_dtype = None if down is None else down.dtype
        ctx.up_dtype = up.dtype
        ctx.scale = scale
        down_c = None if down is None else cast_scaled(down, dtype)
        up_c = cast_scaled(up, dtype, scale)  # s·U: s rides on the smallest tensor, in the cast kernel
        y = F.linear(x, base_weight(weight, w_scale, dtype), bias)
        x2 = x.reshape(-1, x.shape[-1])
        left = x2 if down_c is None else x2 @ down_c.t()
        y.view(-1, y.shape[-1]).addmm_(left, up_c.t())
        ctx.x_shape = x.shape
        # L is x itself for a rebuilt ΔW; LoRA keeps its thin N×r product for grad up
        ctx.save_for_backward(x2, weight, w_scale, down_c, up_c, left if down_c is not None else None)
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x2, weight, w_scale, down_c, up_c, left = ctx.saved_tensors
        has_down = down_c is not None
        if left is None:
            left = x2
        need_x, need_w, _, need_b, need_down, need_up, _ = ctx.needs_input_grad
        g2 = grad_y.reshape(-1, grad_y.shape[-1])
        gx = gw = gb = gdown = gup = None
        # grad of L: g·(s·U) (N×r for LoRA); for a rebuilt ΔW it feeds grad x directly
        g_left = g2 @ up_c if has_down and (need_x or need_down) else None
        if need_x:
            gx = g2 @ base_weight(weight, w_scale, g2.dtype)
            if has_down:
                gx.addmm_(g_left, down_c)
            else:
                gx.addmm_(g2, up_c)
            gx = gx.view(ctx.x_shape)
        if need_w:
            gw = g2.t() @ x2
        if need_b:
            gb = g2.sum(0)
        if need_up:  # ∂/∂U = s·gᵀ·L; s rides on the cast back
            gup = cast_scaled(g2.t() @ left, ctx.up_dtype, ctx.scale)
        if need_down:
            gdown = cast_scaled(g_left.t() @ x2, ctx.down_dtype)
        return gx, gw, None, gb, gdown, gup, None


def adapter_linear(
    x: Tensor,
    weight: BaseWeight,
    bias: Tensor | None,
    down: Tensor | None,
    up: Tensor,
    scale: float = 1.0,
) -> Tensor:
    """x·Wᵀ + b + s·(x·Dᵀ)·Uᵀ, or x·Wᵀ + b + s·x·Uᵀ with `down` None; one autograd node.

    x (..., I), weight (O, I), bias (O,) or None, down (r, I) or None, up (O, r) or (O, I) without down.
    x, weight and bias share the compute dtype (or weight is an fp8 (weight, scale or None) pair); down and up
    may be fp32 parameters (cast inside).
    """
    weight, w_scale = split_base_weight(weight, "adapter_linear")
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
    if not isinstance(scale, float):
        raise TypeError(f"adapter_linear: scale must be a Python float, got {type(scale).__name__}")
    return AdapterLinear.apply(x, weight, w_scale, bias, down, up, scale)


# (raw factors, compute dtype, s) → (ΔW, the cast factors) or None: see DeltaRule
RawBuild = Callable[[Sequence[Tensor], torch.dtype, float], tuple[Tensor, list[Tensor]] | None]


@dataclass(frozen=True)
class DeltaRule:
    """How ΔW (O, I) comes from an algorithm's factors, as two pure functions of the factors already cast to
    the compute dtype with s folded into factor `scaled_index`:

    - build(factors) → ΔW;
    - grads(grad_ΔW, factors, needs) → the grads of those cast factors (None where `needs` is False);
    - raw_build(raw factors, dtype, s), optional → (ΔW, the cast factors), both bit for bit what the casts
      and build give, from one kernel that casts in registers (each cast would be a launch of its own), or
      None where that kernel does not take the call.
    """

    name: str
    build: Callable[[Sequence[Tensor]], Tensor]
    grads: Callable[[Tensor, Sequence[Tensor], Sequence[bool]], Sequence[Tensor | None]]
    scaled_index: int = 0
    raw_build: RawBuild | None = None

    def build_cast(
        self, factors: Sequence[Tensor], dtype: torch.dtype, scale: float
    ) -> tuple[Tensor, list[Tensor]]:
        """(ΔW, the factors cast to `dtype` with s folded into `scaled_index`) from the raw factors: raw_build
        where it takes them, else the casts and build."""
        built = None if self.raw_build is None else self.raw_build(factors, dtype, scale)
        if built is not None:
            return built
        cast = [
            cast_scaled(f, dtype, scale if i == self.scaled_index else 1.0) for i, f in enumerate(factors)
        ]
        return self.build(cast), cast


class RebuildLinear(torch.autograd.Function):
    """y = x·Wᵀ + b + x·ΔWᵀ with ΔW = rule.build(factors) built inside the node; see the module docstring.

    Saves ΔW (as the unfused path saves it for its grad-x product) and the cast factors; backward forms
    grad ΔW = gᵀ·x once and hands it to the rule's pure gradient function.
    """

    @staticmethod
    def forward(ctx, x, weight, w_scale, bias, rule, scale, *factors):  # type: ignore[override]
        dtype = x.dtype
        ctx.rule, ctx.scale = rule, scale
        ctx.factor_dtypes = [f.dtype for f in factors]
        delta, cast = rule.build_cast(factors, dtype, scale)
        if delta.shape != weight.shape:
            raise ValueError(
                f"rebuild_linear: the {rule.name} factors give ΔW {tuple(delta.shape)}, the layer weight is "
                f"{tuple(weight.shape)}"
            )
        y = F.linear(x, base_weight(weight, w_scale, dtype), bias)
        x2 = x.reshape(-1, x.shape[-1])
        y.view(-1, y.shape[-1]).addmm_(x2, delta.t())
        ctx.x_shape = x.shape
        ctx.save_for_backward(x2, weight, w_scale, delta, *cast)
        return y

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        x2, weight, w_scale, delta, *cast = ctx.saved_tensors
        need_x, need_w, _, need_b, _, _, *need_f = ctx.needs_input_grad
        g2 = grad_y.reshape(-1, grad_y.shape[-1])
        gx = gw = gb = None
        if need_x:
            gx = (g2 @ base_weight(weight, w_scale, g2.dtype)).addmm_(g2, delta).view(ctx.x_shape)
        # grad W and grad ΔW are the same product gᵀ·x: formed once
        g_delta = g2.t() @ x2 if need_w or any(need_f) else None
        if need_w:
            gw = g_delta
        if need_b:
            gb = g2.sum(0)
        grads: list[Tensor | None] = [None] * len(cast)
        if any(need_f):
            rule = ctx.rule
            raw = rule.grads(g_delta, cast, need_f)
            for i, (g, dt) in enumerate(zip(raw, ctx.factor_dtypes)):
                # the factor that carried s: ∂/∂f = s·∂/∂(s·f); s rides on the cast back
                grads[i] = (
                    None if g is None else cast_scaled(g, dt, ctx.scale if i == rule.scaled_index else 1.0)
                )
        return (gx, gw, None, gb, None, None, *grads)


def rebuild_linear(
    x: Tensor,
    weight: BaseWeight,
    bias: Tensor | None,
    rule: DeltaRule,
    scale: float,
    factors: Sequence[Tensor],
) -> Tensor:
    """x·Wᵀ + b + x·ΔWᵀ, ΔW = rule.build(factors cast, s folded), as one autograd node with grads to the factors.

    x, weight and bias share the compute dtype (or weight is an fp8 (weight, scale or None) pair); the factors
    may be fp32 parameters (cast inside).
    """
    weight, w_scale = split_base_weight(weight, "rebuild_linear")
    if not isinstance(scale, float):
        raise TypeError(f"rebuild_linear: scale must be a Python float, got {type(scale).__name__}")
    return RebuildLinear.apply(x, weight, w_scale, bias, rule, scale, *factors)


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
