"""The LoKr adapter module; `networks.lokr` is its sd-scripts entry module (docs/architecture.md, LoKr).

ΔW = s·kron(W1, W2) with W1 (a, c) small and W2 (b, d[, kh, kw]) full, low-rank or Tucker. The layout
is planned per layer (`plan_lokr`) or read back from a file's shapes, never from kwargs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from networks import paths
from networks.functional import factorization, lokr_bypass_linear, lokr_delta_weight, make_w1, make_w2
from networks.functional.fused_linear import BaseWeight, rebuild_linear
from networks.functional.lokr import LOKR_RULES
from networks.modules.adapter import AdapterModule, dropout_kwargs, kaiming_
from networks.modules.alpha import alpha_or_rank, file_alpha
from networks.network_args import NetworkArgs

logger = logging.getLogger(__name__)
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


@dataclass(frozen=True)
class LoKrLayout:
    a: int  # W1 rows   (O = a·b)
    b: int  # W2 rows
    c: int  # W1 cols   (I = c·d)
    d: int  # W2 cols
    w1_rank: int | None  # None → full lokr_w1
    w2_mode: str  # "full" | "lowrank" | "tucker"
    rank: int  # r of α/r (the network_dim for both-full modules)

    @property
    def both_full(self) -> bool:
        return self.w1_rank is None and self.w2_mode == "full"

    def describe(self, kernel: tuple[int, int]) -> str:
        w2 = {"full": "full", "lowrank": f"r{self.rank}", "tucker": f"tucker r{self.rank}"}[self.w2_mode]
        w1 = "full" if self.w1_rank is None else f"r{self.w1_rank}"
        k = "" if kernel == (1, 1) else f"×{kernel[0]}×{kernel[1]}"
        return f"{self.a}×{self.c} ({w1}) ⊗ {self.b}×{self.d}{k} ({w2})"


def plan_lokr(
    out_dim: int,
    in_dim: int,
    kernel: tuple[int, int],
    rank: int,
    factor: int = -1,
    decompose_both: bool = False,
    use_tucker: bool = False,
    full_matrix: bool = False,
) -> LoKrLayout:
    """The layout rules of docs/architecture.md, LoKr (full-matrix switch at r ≥ max(b, d)/2)."""
    a, b = factorization(out_dim, factor)
    c, d = factorization(in_dim, factor)
    w1_rank = rank if decompose_both and rank < max(a, c) / 2 else None
    if full_matrix or rank >= max(b, d) / 2:
        w2_mode = "full"
    elif use_tucker and kernel != (1, 1):
        w2_mode = "tucker"
    else:
        w2_mode = "lowrank"
    return LoKrLayout(a, b, c, d, w1_rank, w2_mode, rank)


class LoKrModule(AdapterModule):
    algo = "lokr"
    plus_param_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b")

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module,
        multiplier: float,
        layout: LoKrLayout,
        alpha: float | None,
        use_scalar: bool = False,
        **dropouts: Any,
    ) -> None:
        super().__init__(lora_name, org_module, multiplier, **dropouts)
        L = layout
        if L.a * L.b != self.out_dim or L.c * L.d != self.in_dim:
            raise ValueError(
                f"{lora_name}: LoKr factors {L.a}×{L.c} ⊗ {L.b}×{L.d} do not fit the layer "
                f"({self.out_dim} out, {self.in_dim} in)"
            )
        self.lokr_layout = L
        # a Tucker W2 is written to files as its full 4-D product unless this is set (see file_tensors)
        self.keep_tucker_file = False
        # the fused node's rule and its factors in rule order (functional/lokr.py), fixed by the layout
        names = ("lokr_w1",) if L.w1_rank is None else ("lokr_w1_a", "lokr_w1_b")
        names += ("lokr_w2",) if L.w2_mode == "full" else ("lokr_w2_a", "lokr_w2_b")
        self._node_rule = (LOKR_RULES[(L.w1_rank is not None, L.w2_mode != "full")], names)
        kh, kw = self.kernel_size
        k = kh * kw
        if L.w1_rank is None:
            self.lokr_w1 = self._new_param(L.a, L.c)
        else:
            self.lokr_w1_a = self._new_param(L.a, L.w1_rank)
            self.lokr_w1_b = self._new_param(L.w1_rank, L.c)
        if L.w2_mode == "full":
            self.lokr_w2 = self._new_param(L.b, L.d, kh, kw) if self.is_kxk else self._new_param(L.b, L.d)
        elif L.w2_mode == "lowrank":
            self.lokr_w2_a = self._new_param(L.b, L.rank)
            self.lokr_w2_b = self._new_param(L.rank, L.d * k)
        else:
            if not self.is_kxk:
                raise ValueError(f"{lora_name}.lokr_t2: Tucker layout needs a k×k conv layer")
            self.lokr_t2 = self._new_param(L.rank, L.rank, kh, kw)
            self.lokr_w2_a = self._new_param(L.rank, L.b)
            self.lokr_w2_b = self._new_param(L.rank, L.d)
        # W1 kaiming; the W2 side's zero factor makes ΔW start at 0 (kaiming with σ)
        with torch.no_grad():
            for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_t2"):
                if hasattr(self, name):
                    kaiming_(getattr(self, name))
            zero = self.lokr_w2 if L.w2_mode == "full" else self.lokr_w2_b
            if L.w2_mode != "full":
                kaiming_(self.lokr_w2_a)
            if use_scalar:
                self._enable_scalar()
                kaiming_(zero)
            else:
                nn.init.zeros_(zero)
        if L.both_full:  # α is ignored: s = 1 and the file carries α = r
            self._set_alpha(float(L.rank), L.rank, 1.0)
        else:
            alpha = alpha_or_rank(alpha, L.rank)
            self._set_alpha(alpha, L.rank, alpha / L.rank)
        # the factors this layout has (fixed from here on), read per call from the parameter table: a getattr
        # miss on a Module (an absent factor) raises and catches an AttributeError, ~1 µs per name per call
        self._factor_names = tuple(n for n in LOKR_KEYS if n in self._parameters)

    @classmethod
    def create(
        cls,
        lora_name: str,
        org: nn.Module,
        multiplier: float,
        rank: int,
        alpha: float | None,
        args: NetworkArgs,
    ) -> LoKrModule:
        w = org.weight
        kernel = tuple(w.shape[2:]) if w.dim() == 4 else (1, 1)
        layout = plan_lokr(
            w.shape[0],
            w.shape[1],
            kernel,
            rank,
            args.factor,
            args.decompose_both,
            args.use_tucker,
            args.full_matrix,
        )
        module = cls(
            lora_name, org, multiplier, layout, alpha, use_scalar=args.use_scalar, **dropout_kwargs(args)
        )
        module.keep_tucker_file = args.keep_tucker_file
        return module

    @classmethod
    def from_tensors(
        cls,
        lora_name: str,
        org: nn.Module,
        tensors: dict[str, torch.Tensor],
        multiplier: float,
        args: NetworkArgs,
    ) -> LoKrModule:
        for k in tensors:
            if k not in LOKR_KEYS and k != "alpha":
                raise KeyError(
                    f"{lora_name}.{k}: unsupported LoKr key (expected {', '.join(LOKR_KEYS)}, alpha)"
                )
        t = tensors
        if "lokr_w1" in t:
            a, c = t["lokr_w1"].shape[:2]
            w1_rank = None
        elif "lokr_w1_a" in t and "lokr_w1_b" in t:
            a, w1_rank, c = t["lokr_w1_a"].shape[0], int(t["lokr_w1_a"].shape[1]), t["lokr_w1_b"].shape[1]
        else:
            raise KeyError(f"{lora_name}.lokr_w1: missing (need lokr_w1 or lokr_w1_a + lokr_w1_b)")
        w = org.weight
        out_dim, in_dim = int(w.shape[0]), int(w.shape[1])
        if out_dim % a or in_dim % c:
            raise ValueError(
                f"{lora_name}.lokr_w1: W1 of shape ({a}, {c}) does not divide the layer ({out_dim} out, {in_dim} in)"
            )
        b, d = out_dim // a, in_dim // c
        if "lokr_w2" in t:
            w2_mode, rank = "full", None
        elif "lokr_w2_a" in t and "lokr_w2_b" in t:
            w2_mode = "tucker" if "lokr_t2" in t else "lowrank"
            rank = int(t["lokr_w2_b"].shape[0])
        else:
            raise KeyError(f"{lora_name}.lokr_w2: missing (need lokr_w2 or lokr_w2_a + lokr_w2_b)")
        if rank is None:
            rank = w1_rank
        alpha_t = t.get("alpha")
        alpha = None if alpha_t is None else float(alpha_t.float())
        if rank is None:  # both full: s = 1, remember the file's α as "r" to write it back unchanged
            rank = int(alpha) if alpha and float(alpha).is_integer() and alpha > 0 else 1
        alpha = file_alpha(lora_name, t, rank)
        layout = LoKrLayout(int(a), b, int(c), d, w1_rank, w2_mode, rank)
        module = cls(lora_name, org, multiplier, layout, alpha, **dropout_kwargs(args))
        module.keep_tucker_file = args.keep_tucker_file
        for name, p in module.named_parameters():
            if name not in t:
                raise KeyError(
                    f"{lora_name}.{name}: missing from the weights for layout {layout.describe(module.kernel_size)}"
                )
            got = tuple(module.normalize_file_tensor(name, t[name]).shape)
            if got != tuple(p.shape):
                raise ValueError(
                    f"{lora_name}.{name}: shape {tuple(t[name].shape)} does not fit the layer "
                    f"{tuple(module.layer_shape)} (expected {tuple(p.shape)})"
                )
        return module

    def alpha_is_ignored(self) -> bool:
        return self.lokr_layout.both_full

    def normalize_file_tensor(self, key: str, t: torch.Tensor) -> torch.Tensor:
        # LyCORIS writes a full W2 of a 1×1 conv as (b, d, 1, 1); we keep it 2-D
        if key == "lokr_w2" and not self.is_kxk and t.dim() == 4 and tuple(t.shape[2:]) == (1, 1):
            return t.reshape(t.shape[0], t.shape[1])
        return t

    def writes_full_w2(self) -> bool:
        """A Tucker W2 saved as its full (b, d, kh, kw) product: ComfyUI's LoKr loader cannot apply a
        `lokr_t2` conv core (its Kronecker product raises and the layer is left unchanged), a full W2 loads
        everywhere, and the ΔW is the same."""
        return self.lokr_layout.w2_mode == "tucker" and not self.keep_tucker_file

    def file_tensors(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        out = super().file_tensors(dtype)
        if not self.writes_full_w2():
            return out
        L = self.lokr_layout
        f = self._factors()
        t2 = f["lokr_t2"]
        assert t2 is not None and f["lokr_w2_a"] is not None and f["lokr_w2_b"] is not None
        acc = torch.promote_types(t2.dtype, torch.float32)
        with torch.no_grad():
            w2 = make_w2(None, f["lokr_w2_a"].to(acc), f["lokr_w2_b"].to(acc), t2.to(acc), self.kernel_size)
            # loaders scale a module with a full W2 by α/rank(W1) when W1 is factored, else by 1: s moves into W2
            file_scale = 1.0 if L.w1_rank is None else self.alpha_value / L.w1_rank
            w2 = w2 * (self.scale / file_scale)
        for key in ("lokr_w2_a", "lokr_w2_b", "lokr_t2"):
            del out[key]
        out["lokr_w2"] = w2.detach().to(dtype if dtype is not None else t2.dtype).contiguous()
        if L.w1_rank is None:  # both full now: α is ignored and the file carries α = r
            out["alpha"] = torch.tensor(float(L.rank), dtype=torch.float32)
        return out

    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.lokr_layout.w2_mode == "tucker" and "lokr_w2" in tensors and "lokr_t2" not in tensors:
            tensors = self._tucker_tensors_from_full(tensors)
        super().load_file_tensors(tensors)

    def _tucker_tensors_from_full(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A file's full 4-D W2 (as `file_tensors` writes it) turned back into this module's Tucker factors
        at the module's own α: exact up to rounding, since such a W2 has mode ranks ≤ r."""
        L = self.lokr_layout
        out = dict(tensors)
        w2 = out.pop("lokr_w2")
        want = (L.b, L.d, *self.kernel_size)
        if tuple(w2.shape) != want:
            raise ValueError(
                f"{self.lora_name}.lokr_w2: shape {tuple(w2.shape)} does not fit this Tucker module "
                f"(expected a full W2 of shape {want})"
            )
        w1_a = out.get("lokr_w1_a")
        file_scale = 1.0
        if w1_a is not None:
            w1_rank = int(w1_a.shape[1])
            file_scale = file_alpha(self.lora_name, out, w1_rank) / w1_rank
        target = w2.double() * (file_scale / self.scale)
        w2_a, w2_b, t2 = tucker_factors(target, L.rank)
        rebuilt = make_w2(None, w2_a, w2_b, t2, self.kernel_size)
        residual = float((rebuilt - target).norm() / target.norm().clamp(min=1e-300))
        tol = 8 * max(torch.finfo(w2.dtype).eps, torch.finfo(torch.float32).eps)
        if residual > tol:
            raise ValueError(
                f"{self.lora_name}.lokr_w2: this full W2 is not of Tucker rank {L.rank} (relative residual "
                f"{residual:.1e}); load the file with its own layout (--dim_from_weights) or the conv_dim it was "
                "trained with"
            )
        out.update(lokr_w2_a=w2_a, lokr_w2_b=w2_b, lokr_t2=t2)
        out["alpha"] = torch.tensor(self.alpha_value, dtype=torch.float32)
        return out

    def _factors(self) -> dict[str, torch.Tensor | None]:
        f: dict[str, torch.Tensor | None] = dict.fromkeys(LOKR_KEYS)
        params = self._parameters
        for n in self._factor_names:
            f[n] = params[n]
        return f

    def w1(self) -> torch.Tensor:
        f = self._factors()
        return make_w1(f["lokr_w1"], f["lokr_w1_a"], f["lokr_w1_b"])

    def w2(self) -> torch.Tensor:
        f = self._factors()
        return make_w2(
            f["lokr_w2"],
            f["lokr_w2_a"],
            f["lokr_w2_b"],
            f["lokr_t2"],
            self.kernel_size if self.is_kxk else None,
        )

    def delta_weight_scaled(self, scale: float | torch.Tensor) -> torch.Tensor:
        f = self._factors()
        shape = self.layer_shape if self.is_kxk else (self.out_dim, self.in_dim)
        return lokr_delta_weight(
            f["lokr_w1"],
            f["lokr_w1_a"],
            f["lokr_w1_b"],
            f["lokr_w2"],
            f["lokr_w2_a"],
            f["lokr_w2_b"],
            f["lokr_t2"],
            scale,
            shape,
        )

    def has_factored_form(self) -> bool:
        return not self.is_conv  # the bypass is written for Linear layers

    def choose_factored(self, tokens: int, policy: paths.PathPolicy) -> bool:
        L = self.lokr_layout
        return paths.select_lokr_path(policy, tokens, L.a, L.b, L.c, L.d) == "bypass"

    def branch(self, x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
        if paths.factored(self, x):
            w1, w2 = self.w1(), self.w2()
            if w1.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
                w1, w2 = w1.to(x.dtype), w2.to(x.dtype)
            return lokr_bypass_linear(x, w1, w2, scale)
        return super().branch(x, scale)

    def factor_node_output(
        self, x: torch.Tensor, weight: BaseWeight, bias: torch.Tensor | None, scale: float
    ) -> torch.Tensor:
        rule, names = self._node_rule
        params = self._parameters
        return rebuild_linear(x, weight, bias, rule, scale, [params[n] for n in names])

    def norm_for_max(self) -> torch.Tensor:
        # ‖kron(W1, W2)‖ = ‖W1‖·‖W2‖: no Kronecker product needed
        s = self.total_scale(1.0)
        n = self.w1().detach().float().norm() * self.w2().detach().float().norm()
        return n * (s.detach().abs() if isinstance(s, torch.Tensor) else abs(s))

    def max_norm_param_names(self) -> tuple[str, ...]:
        first = "lokr_w1" if self.lokr_layout.w1_rank is None else "lokr_w1_a"
        second = "lokr_w2" if self.lokr_layout.w2_mode == "full" else "lokr_w2_a"
        return (first, second)

    def scalar_bake_name(self) -> str:
        return "lokr_w1" if self.lokr_layout.w1_rank is None else "lokr_w1_a"

    def layout(self) -> str:
        return self.lokr_layout.describe(self.kernel_size)

    def describe(self) -> dict[str, Any]:
        row = super().describe()
        if self.lokr_layout.both_full:  # the file still carries α = r so that s = 1 in every loader
            row["alpha"] = "α ignored (full W2)"
        return row

    @classmethod
    def log_created(cls, modules: list[AdapterModule], args: NetworkArgs) -> None:
        note = tucker_file_note(modules)
        if note:
            logger.info(note)
        full = full_w2_count(modules)
        if full:
            logger.warning(
                "LoKr: %d of %d modules use a full W2 (r ≥ max(b,d)/2 at factor %d); α is ignored there (scale 1)",
                full,
                len(modules),
                args.factor,
            )


def tucker_factors(w2: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w2_a (r, b), w2_b (r, d), t2 (r, r, kh, kw)) of the rank-r HOSVD of a 4-D W2, in `make_w2`'s
    convention: W2 ≈ t2 ×₁ w2_aᵀ ×₂ w2_bᵀ, exact when both mode ranks of W2 are ≤ r (rows past a smaller
    mode rank are zero)."""
    b, d = int(w2.shape[0]), int(w2.shape[1])
    u1 = torch.linalg.svd(w2.reshape(b, -1), full_matrices=False)[0][:, :rank]
    u2 = torch.linalg.svd(w2.transpose(0, 1).reshape(d, -1), full_matrices=False)[0][:, :rank]
    w2_a = w2.new_zeros(rank, b)
    w2_b = w2.new_zeros(rank, d)
    w2_a[: u1.shape[1]] = u1.T
    w2_b[: u2.shape[1]] = u2.T
    t2 = torch.einsum("qjxy,iq,kj->ikxy", w2, w2_a, w2_b)
    return w2_a, w2_b, t2


def tucker_file_note(modules: list[AdapterModule]) -> str | None:
    """The one log line saying that Tucker conv modules are written with a full W2 (None if there are none)."""
    n = sum(1 for m in modules if isinstance(m, LoKrModule) and m.writes_full_w2())
    if not n:
        return None
    return (
        f"LoKr: {n} Tucker conv modules are saved with a full 4-D lokr_w2 (the same ΔW; ComfyUI cannot apply "
        "a lokr_t2 conv core); network_args keep_tucker_file=True keeps the factored form"
    )


def full_w2_count(modules: list[AdapterModule]) -> int:
    return sum(1 for m in modules if isinstance(m, LoKrModule) and m.lokr_layout.w2_mode == "full")
