"""The per-layer adapter base class shared by LoRA, LoHa and LoKr, and the forward patching.

An adapter owns only its factors (named exactly like the file keys), a 0-d fp32 `alpha` buffer and,
with `use_scalar`, a trainable σ. The base layer is referenced, never registered as a child, so the
network's `state_dict()` holds adapter tensors only.

Forward (spec §3.6): y = base(x) + m·s·drop(ΔW_raw·x); the branch is cast to y's dtype and added once.
Several adapters may patch one layer; each layer keeps a list so they stack and unwind in any order.
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from library import fp8
from networks.functional import apply_weight
from networks.functional.common import compute_dtype, conv_padded_input
from networks.functional.fused_linear import adapter_linear
from networks.network_args import NetworkArgs

logger = logging.getLogger(__name__)


SUPPORTED_LEAVES = (nn.Linear, nn.Conv2d)


class DropoutClock:
    """Shared by all adapters of a network: (seed, step) seeds every dropout decision (spec §3.5)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self.step = 0


def mix_seed(*parts: int) -> int:
    """Deterministic 63-bit mix of integers (a SplitMix-style hash), identical on every rank."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (int(p) + 0x9E3779B97F4A7C15 + ((h << 6) & 0xFFFFFFFFFFFFFFFF) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class AdapterModule(nn.Module):
    """Base of LoRAModule / LoHaModule / LoKrModule. Subclasses implement the factor layout."""

    algo: ClassVar[str] = ""
    # parameter names that go into the LoRA+ "plus" group (spec §1.6)
    plus_param_names: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(org_module, SUPPORTED_LEAVES):
            raise TypeError(
                f"{lora_name}: cannot adapt a {type(org_module).__name__}; expected Linear or Conv2d"
            )
        self.lora_name = lora_name
        self._org = [org_module]  # a list so the base layer is not registered as a child
        self.is_conv = isinstance(org_module, nn.Conv2d)
        w_shape = tuple(org_module.weight.shape)
        self.out_dim, self.in_dim = w_shape[0], w_shape[1]
        self.kernel_size: tuple[int, int] = tuple(w_shape[2:]) if self.is_conv else (1, 1)  # type: ignore[assignment]
        self.is_kxk = self.kernel_size != (1, 1)
        self.multiplier = float(multiplier)
        self.enabled = True
        self.dropout = dropout or None
        self.rank_dropout = rank_dropout or None
        self.module_dropout = module_dropout or None
        self.index = 0  # position in the network, seeds its dropout draws
        self.clock: DropoutClock | None = None
        self.te_index: int | None = None  # None for the U-Net/DiT side
        self.original_name = ""
        self.alpha_value = 1.0
        self.scale = 1.0
        self.rank = 0
        self.scalar: nn.Parameter | None = None
        self._device_gens: dict[str, torch.Generator] = {}
        self.merged_forward = False  # opt-in (network arg): y = x·(W + ΔW)ᵀ on rebuilt Linear layers
        self.rank_scale: torch.Tensor | None = None  # view into the network's per-step mask buffer
        self.rank_scale_step = -1
        # module dropout as a 0/1 factor read from the per-step buffer (CUDA graphs, torch.compile) instead of a
        # Python branch; set by the network's use_device_module_dropout()
        self.module_dropout_on_device = False
        self.module_keep: torch.Tensor | None = None
        self.module_keep_step = -1
        self._backup: torch.Tensor | None = None

    # ------------------------------------------------------------------ set-up helpers
    @property
    def org_module(self) -> nn.Module:
        return self._org[0]

    def _org_device(self) -> torch.device:
        return self.org_module.weight.device

    def _set_alpha(self, alpha: float, rank: int, scale: float) -> None:
        self.alpha_value = float(alpha)
        self.rank = int(rank)
        self.scale = float(scale)
        if "alpha" in self._buffers:
            self.alpha.fill_(self.alpha_value)
        else:
            self.register_buffer(
                "alpha", torch.tensor(self.alpha_value, dtype=torch.float32, device=self._org_device())
            )

    def _enable_scalar(self) -> None:
        self.scalar = nn.Parameter(torch.zeros((), dtype=torch.float32, device=self._org_device()))

    def _new_param(self, *shape: int) -> nn.Parameter:
        return nn.Parameter(torch.empty(*shape, dtype=torch.float32, device=self._org_device()))

    @property
    def layer_shape(self) -> tuple[int, ...]:
        return tuple(self.org_module.weight.shape)

    # ------------------------------------------------------------------ maths (subclasses)
    def delta_weight(self, multiplier: float = 1.0) -> torch.Tensor:
        """ΔW incl. s, σ and `multiplier`, shaped exactly like the layer weight."""
        return self.delta_weight_scaled(self.total_scale(multiplier)).reshape(self.layer_shape)

    def branch(self, x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
        """ΔW_raw·x·scale without dropout; default builds ΔW and applies it with the layer's op."""
        dw = self.delta_weight_scaled(scale)
        if dw.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            dw = dw.to(x.dtype)
        return apply_weight(x, dw, self.org_module)

    def delta_weight_scaled(self, scale: float | torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def linear_factors(
        self, x: torch.Tensor, scale: float | torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor] | None:
        """(down, right) with ΔW_raw·x·scale = (x·downᵀ)·rightᵀ on a Linear layer (down None: x·rightᵀ), or
        None for a path that is factored another way (LoKr bypass, LoHa Khatri–Rao). Default: the rebuild,
        (None, ΔW)."""
        return None, self.delta_weight_scaled(scale).reshape(self.out_dim, -1)

    def norm_for_max(self) -> torch.Tensor:
        """‖ΔW‖_F with s and σ, without m (spec §1.5 max-norm step 1)."""
        return self.delta_weight_scaled(self.total_scale(1.0)).detach().float().norm()

    def scale_for_max(self, ratio: torch.Tensor) -> None:
        """Scale the factors so that ΔW is multiplied by `ratio` (σ alone when present)."""
        if self.scalar is not None:
            self.scalar.data.mul_(ratio)
            return
        root = ratio.sqrt()
        for name in self.max_norm_param_names():
            p = getattr(self, name) if "." not in name else self.get_parameter(name)
            p.data.mul_(root.to(p.dtype))

    def max_norm_param_names(self) -> tuple[str, ...]:
        raise NotImplementedError

    def total_scale(self, multiplier: float) -> float | torch.Tensor:
        s = self.scale * multiplier
        if self.scalar is not None:
            return self.scalar * s
        return s

    # ------------------------------------------------------------------ file tensors
    def file_tensors(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Tensors to save (keys without the lora_name prefix): σ baked, alpha 0-d fp32."""
        out: dict[str, torch.Tensor] = {}
        bake = self.scalar_bake_name() if self.scalar is not None else None
        for name, p in self.named_parameters():
            if name == "scalar":
                continue
            t = p.detach()
            target = dtype if dtype is not None else p.dtype
            if name == bake:  # σ·factor in fp32, then one cast
                t = t.float() * self.scalar.detach().float()  # type: ignore[union-attr]
            out[name] = t.to(target) if t.dtype != target else t.clone()
        out["alpha"] = torch.tensor(self.alpha_value, dtype=torch.float32)
        return {k: v.contiguous() for k, v in out.items()}

    def scalar_bake_name(self) -> str:
        raise NotImplementedError

    def normalize_file_tensor(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """Hook for accepted alternative layouts (e.g. LyCORIS 4-D 1×1 `lokr_w2`)."""
        return t

    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Strictly copy a module's file tensors in; errors name the full key."""
        own = {n: p for n, p in self.named_parameters() if n != "scalar"}
        for key in tensors:
            if key != "alpha" and key not in own:
                raise KeyError(
                    f"{self.lora_name}.{key}: unexpected key for this {self.algo} module "
                    f"(expected {sorted(own)} + alpha)"
                )
        for name, p in own.items():
            if name not in tensors:
                raise KeyError(f"{self.lora_name}.{name}: missing from the weights")
            t = self.normalize_file_tensor(name, tensors[name])
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(
                    f"{self.lora_name}.{name}: shape {tuple(t.shape)} in the weights does not match "
                    f"the network's {tuple(p.shape)}"
                )
            with torch.no_grad():
                p.copy_(t.to(device=p.device, dtype=p.dtype))
        if self.scalar is not None:  # files carry σ baked into the factors
            with torch.no_grad():
                self.scalar.fill_(1.0)
        if "alpha" in tensors:
            a = float(tensors["alpha"].float())
            if a == 0.0:  # ComfyUI renders an α = 0 file as nothing; we read it as α = r (spec §3.7)
                logger.warning("%s.alpha is 0; treating it as the rank %d", self.lora_name, self.rank)
                a = float(self.rank)
            if not self.alpha_is_ignored():
                self._set_alpha(a, self.rank, a / self.rank)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):  # type: ignore[no-untyped-def]
        # accept the alternative file layouts in nn.Module.load_state_dict too (gen_img's path)
        for name in list(self._parameters):
            key = prefix + name
            if key in state_dict:
                state_dict[key] = self.normalize_file_tensor(name, state_dict[key])
        if prefix + "alpha" in state_dict:  # alpha is recorded as a Python float for the scale
            a = float(state_dict[prefix + "alpha"].float())
            if a != 0.0 and not self.alpha_is_ignored():
                self.alpha_value = a
                self.scale = a / self.rank
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def alpha_is_ignored(self) -> bool:
        return False

    # ------------------------------------------------------------------ forward
    def _device_gen(self, device: torch.device) -> torch.Generator:
        key = str(device)
        g = self._device_gens.get(key)
        if g is None:
            g = torch.Generator(device=device)
            self._device_gens[key] = g
        return g

    def rank_keep_scale_cpu(self) -> torch.Tensor:
        """keep/(1−p) over the O output channels for this step, drawn on the CPU (spec §3.5)."""
        p = float(self.rank_dropout or 0.0)
        g = torch.Generator().manual_seed(self._seed(1))
        return (torch.rand(self.out_dim, generator=g) >= p).float() / (1.0 - p)

    def module_keep_cpu(self) -> float:
        """1.0 if this module is kept this step, 0.0 if module dropout drops it; decided on the CPU (spec §3.5)."""
        g = torch.Generator().manual_seed(self._seed(0))
        return 0.0 if float(torch.rand(1, generator=g)[0]) < float(self.module_dropout or 0.0) else 1.0

    def _module_keep(self, device: torch.device) -> torch.Tensor:
        clock = self.clock
        if self.module_keep is not None and clock is not None and self.module_keep_step == clock.step:
            return self.module_keep
        return torch.tensor([self.module_keep_cpu()], device=device)

    def _rank_keep_scale(self, device: torch.device) -> torch.Tensor:
        # The network fills `rank_scale` once per step (one copy for all modules, at a fixed address so a
        # CUDA graph can replay it); a module used outside that (tests, a bare forward) draws its own.
        clock = self.clock
        if self.rank_scale is not None and clock is not None and self.rank_scale_step == clock.step:
            return self.rank_scale
        return self.rank_keep_scale_cpu().to(device, non_blocking=True)

    def _seed(self, kind: int) -> int:
        clock = self.clock
        seed, step = (clock.seed, clock.step) if clock is not None else (0, 0)
        return mix_seed(seed, step, self.index, kind)

    def delta_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """m·s·drop(ΔW_raw·x), or None when nothing is to be added (disabled, m = 0, module dropped)."""
        if not self.enabled or self.multiplier == 0.0:
            return None
        training = self.training
        keep_on_device = training and bool(self.module_dropout) and self.module_dropout_on_device
        # The decision comes from a CPU generator: no GPU sync, same on every rank and on recompute.
        if training and self.module_dropout and not keep_on_device and self.module_keep_cpu() == 0.0:
            return None
        out = self.branch(x, self.total_scale(self.multiplier))
        if keep_on_device:
            out = out * self._module_keep(out.device).to(out.dtype).view([1] * out.dim())
        if training and (self.rank_dropout or self.dropout):
            ch_dim = 1 if self.is_conv else out.dim() - 1
            if self.rank_dropout:
                shape = [1] * out.dim()
                shape[ch_dim] = self.out_dim
                out = out * self._rank_keep_scale(out.device).to(out.dtype).view(shape)
            if self.dropout:
                p = self.dropout
                g = self._device_gen(out.device)
                g.manual_seed(self._seed(2))
                keep = torch.rand(out.shape, generator=g, device=out.device) >= p
                out = out * keep.to(out.dtype) / (1.0 - p)
        return out

    def _active_on_device(self) -> bool:
        """A branch that is on and has nothing decided on the host per call (neuron/module dropout)."""
        host_module_dropout = bool(self.module_dropout) and not self.module_dropout_on_device
        return (
            self.enabled
            and self.multiplier != 0.0
            and not (self.training and (self.dropout or host_module_dropout))
        )

    def _fusable(self) -> bool:
        return not self.is_conv and self._active_on_device()

    def _masked_right(self, right: torch.Tensor) -> torch.Tensor:
        if not self._step_masked():
            return right
        if self.rank_dropout:  # an output-channel mask = a row mask on right
            keep = self._rank_keep_scale(right.device).to(right.dtype)
            right = right * keep.view(-1, *([1] * (right.dim() - 1)))
        if self.module_dropout and self.module_dropout_on_device:  # ×0 drops the branch
            right = right * self._module_keep(right.device).to(right.dtype).view([1] * right.dim())
        return right

    def merged_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """`merged_forward`: the whole layer as x·(W + ΔW)ᵀ + b (or conv(x, W + ΔW) + b), one GEMM/conv instead
        of two, also for grad x.

        W + ΔW is formed in fp32 and rounded once to the matmul dtype, so in bf16 ΔW is rounded against W:
        opt-in only (docs/benchmarks.md has its measured effect). It always rebuilds ΔW, also where the cost
        model would pick a factored path (LoKr bypass, LoHa Khatri–Rao): merged, the rebuild is the faster one
        (H100 run 10). An fp8 base (library/fp8.py) takes part dequantized: W is fp8 × scale in fp32. None
        when it does not apply: not set, host-side dropout, or a base that is not a plain nn.Linear / nn.Conv2d
        with a floating-point weight.
        """
        base = self.org_module
        if (
            not self.merged_forward
            or type(base) not in (nn.Linear, nn.Conv2d)
            or not self._active_on_device()
        ):
            return None
        if not base.weight.dtype.is_floating_point:
            return None
        dw = self.delta_weight_scaled(self.total_scale(self.multiplier)).reshape(base.weight.shape)
        acc = torch.float64 if base.weight.dtype == torch.float64 else torch.float32  # fp32 at least
        w = fp8.dequantized_weight(base, acc) + self._masked_right(dw).to(acc)
        if not torch.is_autocast_enabled(x.device.type):
            w = w.to(x.dtype)
        if self.is_conv:
            x, padding = conv_padded_input(x, base)
            return F.conv2d(x, w, base.bias, base.stride, padding, base.dilation, base.groups)
        return F.linear(x, w, base.bias)

    def add_branch(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + m·s·drop(ΔW_raw·x). On a Linear layer the branch's last GEMM accumulates into y (addmm, β = 1):
        no N×O branch tensor is written and read back for a separate add (spec §6 rule 4)."""
        if self._fusable():
            factors = self.linear_factors(x, self.total_scale(self.multiplier))
            autocast_on = torch.is_autocast_enabled(y.device.type)
            if factors is not None:
                down, right = factors[0], self._masked_right(factors[1])
                left = x if down is None else F.linear(x, down if autocast_on else down.to(x.dtype))
                if not autocast_on:  # autocast casts the operands itself
                    left, right = left.to(y.dtype), right.to(y.dtype)
                out = torch.addmm(y.reshape(-1, self.out_dim), left.reshape(-1, left.shape[-1]), right.t())
                # not a view (as matmul does for N-d inputs): a view with a `_base` reaching a compiled block
                # from an eager layer (proj_in) makes dynamo guard on the base and compile the block again
                return torch.ops.aten._unsafe_view(out, y.shape)
        d = self.delta_output(x)
        return y if d is None else y + d.to(y.dtype)

    def fused_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """The whole layer, base and branch, as one autograd node (functional/fused_linear.py): grad x is
        accumulated in place instead of written twice and added, and the factors' casts and s run inside the
        node. Exact (the same products as plain autograd). None where it does not apply: a conv, a factored
        path, host-side dropout, a base that is not a plain nn.Linear with a frozen float weight of 16 bits or
        more."""
        base = self.frozen_linear_base()
        if base is None or not self._fusable():
            return None
        dtype = compute_dtype(x)
        x, w, b = (t if t is None or t.dtype == dtype else t.to(dtype) for t in (x, base.weight, base.bias))
        scale = self.total_scale(self.multiplier)
        if isinstance(scale, float) and not self._step_masked():
            out = self.factor_node_output(x, w, b, scale)
            if out is not None:
                return out
        factors = self.linear_factors(x, scale)
        if factors is None:
            return None
        return adapter_linear(x, w, b, factors[0], self._masked_right(factors[1]))

    def factor_node_output(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float
    ) -> torch.Tensor | None:
        """Subclass hook of fused_output: the layer as one node fed the raw factors and s (no mask to apply),
        or None to build ΔW (or the factors) with autograd outside the node."""
        return None

    def _step_masked(self) -> bool:
        """A per-step mask (rank dropout, module dropout read on the device) multiplies the branch."""
        return self.training and bool(
            self.rank_dropout or (self.module_dropout and self.module_dropout_on_device)
        )

    def frozen_linear_base(self) -> nn.Linear | None:
        """The base layer when it is a plain nn.Linear with a frozen float weight (and bias) of 16 bits or more:
        what the fused and merged nodes take over. None otherwise (convs, subclasses, trained bases, and fp8:
        the fused node would keep a 16-bit copy of the weight for backward where fp8's own node keeps fp8)."""
        base = self.org_module
        if type(base) is not nn.Linear:
            return None
        w, b = base.weight, base.bias
        if w.requires_grad or (b is not None and b.requires_grad):
            return None
        return base if w.dtype.is_floating_point and w.element_size() >= 2 else None

    def layer_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """The layer's whole output when this adapter alone can compute it faster than base + branch
        (merged_forward, or the fused node); None otherwise."""
        out = self.merged_output(x)
        return out if out is not None else self.fused_output(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer_output(x)
        if out is not None:
            return out
        y = self.org_module(x) if not is_patched(self.org_module) else _original_forward(self.org_module)(x)
        return self.add_branch(x, y)

    # ------------------------------------------------------------------ merge
    @torch.no_grad()
    def merge_into_base(self, multiplier: float, device: torch.device | str | None = None) -> None:
        """W ← cast(W_fp32 + m·ΔW_fp32), cast once (spec §4.2)."""
        w = self.org_module.weight
        dev = torch.device(device) if device is not None else w.device
        dw = self.delta_weight_fp32(multiplier, dev)
        merged = fp8.dequantized_weight(self.org_module, torch.float32).to(dev) + dw.reshape(w.shape)
        if fp8.is_fp8(w):  # quantized again (a scaled layer gets fresh scales)
            fp8.store_weight(self.org_module, merged)
            return
        w.data.copy_(merged.to(device=w.device, dtype=w.dtype))

    @torch.no_grad()
    def delta_weight_fp32(self, multiplier: float, device: torch.device) -> torch.Tensor:
        saved = {n: p.data for n, p in self.named_parameters()}
        try:
            for _n, p in self.named_parameters():
                p.data = p.data.to(device=device, dtype=torch.float32)
            return self.delta_weight_scaled(self.total_scale(multiplier)).float()
        finally:
            for n, p in self.named_parameters():
                p.data = saved[n]

    def describe(self) -> dict[str, Any]:
        """A row of the verbose table."""
        return {
            "name": self.lora_name,
            "shape": "x".join(str(s) for s in self.layer_shape),
            "layout": self.layout(),
            "rank": self.rank,
            "alpha": self.alpha_value,
            "scale": self.scale,
            "params": sum(p.numel() for n, p in self.named_parameters() if n != "scalar"),
        }

    def layout(self) -> str:
        return self.algo


# ---------------------------------------------------------------------- patching
_STACK_ATTR = "_lohakr_adapters"
_ORIG_ATTR = "_lohakr_orig_forward"


def is_patched(leaf: nn.Module) -> bool:
    return _STACK_ATTR in leaf.__dict__


def _original_forward(leaf: nn.Module) -> Any:
    return leaf.__dict__[_ORIG_ATTR]


def attach_adapter(leaf: nn.Module, adapter: AdapterModule) -> None:
    """Patch `leaf.forward` (once per leaf) so it adds every attached adapter's branch."""
    if not is_patched(leaf):
        stack: list[AdapterModule] = []
        had_instance_forward = "forward" in leaf.__dict__
        orig = leaf.forward
        # an instance-level forward set by someone else may do more than the class's: keep calling it
        plain_forward = not had_instance_forward

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
        leaf.__dict__["_lohakr_had_instance_forward"] = had_instance_forward
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
        had = leaf.__dict__.pop("_lohakr_had_instance_forward")
        del leaf.__dict__[_STACK_ATTR]
        if had:
            leaf.forward = orig  # type: ignore[method-assign]
        else:
            del leaf.__dict__["forward"]


def kaiming_(t: torch.Tensor) -> torch.Tensor:
    """kaiming-uniform(a=√5), i.e. U(±1/√fan_in) as nn.Linear's default init."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def dropout_kwargs(args: NetworkArgs) -> dict[str, float | None]:
    return {"dropout": args.dropout, "rank_dropout": args.rank_dropout, "module_dropout": args.module_dropout}


def file_alpha(lora_name: str, tensors: dict[str, torch.Tensor], rank: int) -> float:
    """α from a file: missing → r (s = 1); 0 → r with a warning (ComfyUI would render nothing)."""
    t = tensors.get("alpha")
    if t is None:
        return float(rank)
    a = float(t.float())
    if a == 0.0:
        logger.warning("%s.alpha is 0; treating it as the rank %d", lora_name, rank)
        return float(rank)
    return a
