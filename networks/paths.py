"""Which forward path an adapted layer takes: the one place that decides.

Every path computes the same y = base(x) + m·s·drop(ΔW·x) (the tests hold them to each other in fp64);
they differ in speed and memory. The first row of `FORWARD_PATHS` whose condition holds runs:

| path          | runs when                                                                            |
|---------------|--------------------------------------------------------------------------------------|
| `off`         | the adapter is disabled, m = 0, or host-side module dropout dropped it this step     |
| `merged`      | the network arg `merged_forward`, the branch is active on the device, and the base   |
|               | is a plain float Linear/Conv2d (fp8 takes part dequantized; LoRA: a frozen ≥ 16-bit  |
|               | Linear only)                                                                         |
| `fused_node`  | a Linear whose base is a frozen plain nn.Linear with a float weight of ≥ 16 bits or  |
|               | an fp8 one (networks/fp8.py), the branch is active on the device and not factored, σ |
|               | is not trained and no per-step mask applies                                          |
| `fused`       | the same, with a trained σ or a per-step mask: the node takes (down, masked right)   |
| `add_branch`  | a Linear, active on the device and not factored: the base runs, the branch's last    |
|               | GEMM accumulates into its output (addmm)                                             |
| `branch`      | everything else: the base runs, then m·s·drop(branch(x)) is added                    |

`merged`, `fused_node` and `fused` replace the base call, so they run only when one adapter alone patches a
layer called plainly (`layer_path`); with several adapters on a layer each takes `add_branch` or `branch`
(`branch_path`). "Active on the device": enabled, m ≠ 0 and no dropout decided on the host per call
(neuron dropout, module dropout not read from the per-step buffer) while training.

An fp8 base enters the fused rows as its (fp8 weight, scale) pair: the node saves the fp8 weight and
dequantizes it in forward for the base GEMM and again in backward for grad x, as fp8's own node does, so it
keeps no 16-bit copy of W while x is read once and grad x is written once.

Inside `branch` (and for `fused*`/`add_branch`, which need it unfactored) an algorithm with a factored form
(the LoKr bypass on a Linear, LoHa's Khatri–Rao product) takes it when `factored(module, x)`: forced per
module by `use_factored`, else by the module's `PathPolicy` ('auto' asks the cost model of
`networks.functional.dispatch` for the input's token count, cached per count).

The policy belongs to the network (`AdapterNetwork.set_path_policy`); a module outside a network uses
`DEFAULT_POLICY`. See docs/architecture.md for the picture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from networks import fp8
from networks.functional.dispatch import MODES, choose_loha_path, choose_lokr_path

POLICIES = ("auto", "rebuild", "bypass")


@dataclass(frozen=True)
class PathPolicy:
    """'auto' (cost model), or force 'rebuild' / 'bypass' (LoKr bypass, LoHa Khatri–Rao) everywhere;
    `mode` picks the cost model: 'eager', or 'graph' for compiled / graph-replayed steps."""

    path: str = "auto"
    mode: str = "eager"

    def __post_init__(self) -> None:
        if self.path not in POLICIES:
            raise ValueError(f"path policy: path must be one of {POLICIES}, got {self.path!r}")
        if self.mode not in MODES:
            raise ValueError(f"path policy: mode must be one of {sorted(MODES)}, got {self.mode!r}")


DEFAULT_POLICY = PathPolicy()


class AdapterModule(Protocol):
    """What the decision reads of an adapter (networks.modules.adapter.AdapterModule provides it)."""

    org_module: nn.Module
    is_conv: bool
    enabled: bool
    multiplier: float
    training: bool
    dropout: float | None
    rank_dropout: float | None
    module_dropout: float | None
    module_dropout_on_device: bool
    merged_forward: bool
    merged_needs_frozen_linear: bool
    scalar: nn.Parameter | None
    use_factored: bool | None
    path_policy: PathPolicy
    _path_cache: dict[int, bool]

    def has_factored_form(self) -> bool: ...

    def choose_factored(self, tokens: int, policy: PathPolicy) -> bool: ...


def select_lokr_path(policy: PathPolicy, tokens: int, a: int, b: int, c: int, d: int) -> str:
    """'bypass' or 'rebuild' for a linear LoKr with W1 (a, c), W2 (b, d) under `policy`.

    The bypass applies W2 built at (b, d) (small even when low-rank), so the cost model sees a full W2.
    """
    if policy.path != "auto":
        return policy.path
    return choose_lokr_path(tokens, a, b, c, d, None, policy.mode)


def select_loha_path(
    policy: PathPolicy, tokens: int, out_dim: int, in_dim: int, rank: int, conv: bool = False
) -> str:
    """'khatri_rao' or 'rebuild' for a non-Tucker LoHa under `policy`.

    The conv Khatri–Rao path keeps its N×r² middle for backward, so under 'auto' it is taken only
    when that is no larger than the rebuild's O×I·K ΔW (LoHa peak memory must not exceed the rebuild's).
    """
    if policy.path != "auto":
        return "khatri_rao" if policy.path == "bypass" else "rebuild"
    if conv and tokens * rank * rank > out_dim * in_dim:
        return "rebuild"
    return choose_loha_path(tokens, out_dim, in_dim, rank, policy.mode)


# ---------------------------------------------------------------------- the predicates of the table
def factored(m: AdapterModule, x: torch.Tensor) -> bool:
    """The module's factored form (LoKr bypass, LoHa Khatri–Rao) runs for input `x` instead of the rebuild."""
    if not m.has_factored_form():
        return False
    if m.use_factored is not None:
        return m.use_factored
    # tokens from the shape only (capturable): rows of a linear input, B·H·W of a conv input
    tokens = max(x.numel() // max(x.shape[1] if m.is_conv else x.shape[-1], 1), 1)
    # under torch.compile decide without the cache: a guard on each module's own dict would recompile
    # the shared block graph once per block instance (the choice is a pure function of shapes)
    compiling = torch.compiler.is_compiling()
    hit = None if compiling else m._path_cache.get(tokens)
    if hit is None:
        hit = m.choose_factored(tokens, m.path_policy)
        if not compiling:
            m._path_cache[tokens] = hit
    return hit


def active_on_device(m: AdapterModule) -> bool:
    """A branch that is on and has nothing decided on the host per call (neuron/module dropout)."""
    host_module_dropout = bool(m.module_dropout) and not m.module_dropout_on_device
    return m.enabled and m.multiplier != 0.0 and not (m.training and (m.dropout or host_module_dropout))


def step_masked(m: AdapterModule) -> bool:
    """A per-step mask (rank dropout, module dropout read on the device) multiplies the branch."""
    return m.training and bool(m.rank_dropout or (m.module_dropout and m.module_dropout_on_device))


def _float16_or_wider(w: torch.Tensor) -> bool:
    dtype = w.dtype  # itemsize: an attribute, cheaper than the tensor method element_size() on every call
    return dtype.is_floating_point and dtype.itemsize >= 2


def frozen_linear_base(m: AdapterModule, fp8_ok: bool = False) -> nn.Linear | None:
    """The base layer when it is a plain nn.Linear whose weight (and bias) are frozen and whose weight is a
    float of 16 bits or more, or, with `fp8_ok`, an fp8 one (the fused nodes keep it as fp8 and dequantize
    it in forward and backward; LoRA's merged node adds ΔW to W itself, so not for it). None otherwise."""
    base = m.org_module
    if type(base) is not nn.Linear:
        return None
    w, b = base.weight, base.bias
    if w.requires_grad or (b is not None and b.requires_grad):
        return None
    return base if _float16_or_wider(w) or (fp8_ok and fp8.is_fp8(w)) else None


def merged_applies(m: AdapterModule) -> bool:
    """The `merged` row: x·(W + ΔW)ᵀ as one GEMM/conv."""
    if not m.merged_forward:
        return False
    if m.merged_needs_frozen_linear:  # LoRA's merged node takes its grads from thin products
        return not m.is_conv and frozen_linear_base(m) is not None and active_on_device(m)
    base = m.org_module
    # an fp8 base (networks/fp8.py) takes part dequantized: W is fp8 × scale in fp32
    return (
        type(base) in (nn.Linear, nn.Conv2d) and active_on_device(m) and base.weight.dtype.is_floating_point
    )


def fusable(m: AdapterModule, x: torch.Tensor) -> bool:
    """A Linear whose branch is on the device and not factored: its GEMM can join the base's."""
    return not m.is_conv and active_on_device(m) and not factored(m, x)


def fused_path(m: AdapterModule, x: torch.Tensor) -> str | None:
    """'fused_node' | 'fused' where the base and the branch can run as one autograd node, else None."""
    if frozen_linear_base(m, fp8_ok=True) is None or not fusable(m, x):
        return None
    # the node takes s as a Python float: a trained σ makes it a tensor, and the masks need the right factor
    return "fused_node" if m.scalar is None and not step_masked(m) else "fused"


def layer_path(m: AdapterModule, x: torch.Tensor) -> str | None:
    """'merged' | 'fused_node' | 'fused' when this adapter alone computes the whole layer, else None."""
    return "merged" if merged_applies(m) else fused_path(m, x)


def branch_path(m: AdapterModule, x: torch.Tensor) -> str:
    """'add_branch' or 'branch' (which may add nothing: `off`) beside a base call."""
    return "add_branch" if fusable(m, x) else "branch"


FORWARD_PATHS: tuple[str, ...] = ("off", "merged", "fused_node", "fused", "add_branch", "branch")


def forward_path(m: AdapterModule, x: torch.Tensor) -> str:
    """The row of the table a lone adapter on a plainly called layer takes for input `x` (for tests, logs)."""
    if not m.enabled or m.multiplier == 0.0:
        return "off"
    return layer_path(m, x) or branch_path(m, x)
