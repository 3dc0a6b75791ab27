"""Per-layer choice between the equivalent LoKr / LoHa paths (spec networks.md §6 rule 1).

Every path computes the same s·ΔW·x (tested to fp32 tolerance); they differ only in speed and memory.
The choice is a pure function of shapes (never of tensor values), so a module may call it once per
input shape and cache the answer: nothing here syncs with the device or breaks graph capture.

Cost model: each path is a list of kernels (FLOPs, bytes moved). GPU time is the sum over kernels of
max(FLOPs / flops_per_s, bytes / bytes_per_s) + a small gap; host time is ops × a per-op overhead
(Python dispatch, launch, autograd). The GPU runs behind the host, so a layer costs max(GPU, host).
In eager mode the host side dominates at SDXL sizes (tens of µs per op); in graph mode (CUDA graphs /
torch.compile) it vanishes and only the GPU term decides.
"""

from __future__ import annotations

from dataclasses import dataclass

ACT_BYTES = 2  # bf16 activations / compute dtype
PARAM_BYTES = 4  # fp32 factors

Kernel = tuple[float, float]  # (flops, bytes)


@dataclass(frozen=True)
class DeviceModel:
    """Achieved (not peak) rates; defaults calibrated on an H100 by bench/bench_layers.py."""

    flops_per_s: float = 700e12
    bytes_per_s: float = 2.4e12
    gap_s: float = 3e-6  # GPU idle between kernels
    op_overhead_s: float = 45e-6  # host per op in eager (measured ~40-55 µs on the H100 host)


EAGER = DeviceModel()
GRAPH = DeviceModel(op_overhead_s=0.0)
MODES = {"eager": EAGER, "graph": GRAPH}


def _cost(kernels: list[Kernel], model: DeviceModel) -> float:
    gpu = sum(max(f / model.flops_per_s, b / model.bytes_per_s) + model.gap_s for f, b in kernels)
    return max(gpu, len(kernels) * model.op_overhead_s)


def _gemm(m: float, n: float, k: float) -> Kernel:
    """(m, k) @ (k, n) in the compute dtype."""
    return 2.0 * m * n * k, ACT_BYTES * (m * k + k * n + m * n)


def _ew(elems: float, bytes_per_elem: float, small: bool = False) -> Kernel:
    return 0.0, (0.0 if small else elems * bytes_per_elem)


def _lokr_rebuild_kernels(n: int, a: int, b: int, c: int, d: int, w2_rank: int | None) -> list[Kernel]:
    o, i = a * b, c * d
    oi = float(o * i)
    ks: list[Kernel] = []
    if w2_rank is not None:
        ks += [_gemm(b, d, w2_rank), _gemm(b, w2_rank, d), _gemm(w2_rank, d, b)]  # W2 build + its 2 grads
    ks += [_ew(a * c, 8, small=True)]  # W1·s
    ks += [_ew(oi, PARAM_BYTES), _ew(oi, PARAM_BYTES + ACT_BYTES)]  # kron, cast to bf16
    ks += [_gemm(n, o, i)]  # forward
    ks += [_gemm(n, i, o), _gemm(o, i, n)]  # grad x, grad ΔW
    ks += [_ew(oi, ACT_BYTES + PARAM_BYTES)]  # grad ΔW → fp32
    ks += [_ew(oi, 2 * PARAM_BYTES)] * 4  # kron backward: two products, two reductions
    ks += [_ew(a * c, 8, small=True)]  # W1·s backward
    return ks


def _lokr_bypass_kernels(n: int, a: int, b: int, c: int, d: int, w2_rank: int | None) -> list[Kernel]:
    m = n * c  # rows of X viewed (N·c, d)
    o, i = a * b, c * d
    ks: list[Kernel] = [_ew(a * c, 8, small=True)] * 3  # W1·s, casts
    # W1·Y is a batched product of tiny matrices (bandwidth-bound, ~half speed); the backward einsums
    # permute gz, Y, grad Y and x into GEMM layout (copies). Calibrated on the H100 layer bench.
    ks += [_ew(n * o + n * c * b, 2 * ACT_BYTES)] * 2
    ks += [_ew(n * o + 2 * n * c * b + n * i, 2 * ACT_BYTES)]
    if w2_rank is None:
        y = _gemm(m, b, d)
        ks += [y, _gemm(n, a * b, c)]  # Y = X·W2ᵀ, Z = W1·Y (forward)
        ks += [y]  # Y recomputed in backward
        ks += [_gemm(a, c, n * b), _gemm(n * c, b, a)]  # grad W1, grad Y
        ks += [_gemm(m, d, b), _gemm(b, d, m)]  # grad x, grad W2
        ks += [_ew(a * c, 8, small=True)] * 3  # scaled grad, casts back
    else:
        r = w2_rank
        ks += [_gemm(m, r, d), _gemm(m, b, r), _gemm(n, a * b, c)]  # forward chain
        ks += [_gemm(a, c, n * b), _gemm(n * c, b, a)]  # grads of W1·Y
        ks += [_gemm(m, r, b), _gemm(b, r, m)]  # grads of w2a
        ks += [_gemm(m, d, r), _gemm(r, d, m)]  # grads of w2b
        ks += [_ew(a * c, 8, small=True)] * 4
    return ks


def lokr_linear_costs(
    n: int, a: int, b: int, c: int, d: int, w2_rank: int | None = None, mode: str = "eager"
) -> dict[str, float]:
    """Modelled seconds of forward+backward of one LoKr branch on an (a·b)×(c·d) linear, N tokens."""
    model = MODES[mode]
    return {
        "rebuild": _cost(_lokr_rebuild_kernels(n, a, b, c, d, w2_rank), model),
        "bypass": _cost(_lokr_bypass_kernels(n, a, b, c, d, w2_rank), model),
    }


def _loha_rebuild_kernels(n: int, o: int, i: int, r: int) -> list[Kernel]:
    oi = float(o * i)
    ks: list[Kernel] = [_ew(o * r, 8, small=True)] * 5  # w1a·s and the autocast casts
    ks += [_gemm(o, i, r)] * 2 + [_ew(oi, 3 * ACT_BYTES)]  # P1, P2, P1⊙P2
    ks += [_gemm(n, o, i)]  # forward
    ks += [_gemm(n, i, o), _gemm(o, i, n)]  # grad x, grad ΔW
    ks += [_ew(oi, 2 * ACT_BYTES)]  # grad·s
    # custom backward: recompute P2, P1; Ĝ⊙P; two rank-r GEMMs per half
    ks += [_gemm(o, i, r), _ew(oi, 3 * ACT_BYTES), _gemm(o, r, i), _gemm(r, i, o)] * 2
    ks += [_ew(o * r, 8, small=True)] * 8  # casts of the factors and their grads
    return ks


def _loha_kr_kernels(n: int, o: int, i: int, r: int) -> list[Kernel]:
    rr = r * r
    ks: list[Kernel] = [_ew(o * r, 8, small=True)]  # w1a·s
    ks += [_ew(o * rr, PARAM_BYTES), _ew(i * rr, PARAM_BYTES)]  # A1∗A2, B1•B2
    ks += [_ew(o * rr, PARAM_BYTES + ACT_BYTES), _ew(i * rr, PARAM_BYTES + ACT_BYTES)]  # casts
    ks += [_gemm(n, rr, i), _gemm(n, o, rr)]  # forward
    ks += [_gemm(n, rr, i)]  # the N×r² middle recomputed in backward (KhatriRaoLinear)
    ks += [_gemm(n, rr, o), _gemm(o, rr, n), _gemm(n, i, rr), _gemm(rr, i, n)]  # backward GEMMs
    # backward rebuilds both KR factors and their casts, then four einsums for the factor grads
    ks += [_ew(o * rr, PARAM_BYTES), _ew(i * rr, PARAM_BYTES)]
    ks += [_ew(o * rr, PARAM_BYTES + ACT_BYTES), _ew(i * rr, PARAM_BYTES + ACT_BYTES)]
    ks += [_ew(o * rr, 2 * ACT_BYTES)] * 2 + [_ew(i * rr, 2 * ACT_BYTES)] * 2
    ks += [_ew(o * r, 8, small=True)] * 10  # w1a·s, scaled grad, grads → fp32 (measured: more ops)
    return ks


def loha_linear_costs(n: int, o: int, i: int, r: int, mode: str = "eager") -> dict[str, float]:
    """Modelled seconds of forward+backward of one LoHa branch (rank r per half) on an O×I linear."""
    model = MODES[mode]
    return {
        "rebuild": _cost(_loha_rebuild_kernels(n, o, i, r), model),
        "khatri_rao": _cost(_loha_kr_kernels(n, o, i, r), model),
    }


POLICIES = ("auto", "rebuild", "bypass")
_policy = {"path": "auto", "mode": "eager"}


def set_path_policy(path: str = "auto", mode: str = "eager") -> None:
    """Process-wide override: 'auto' (cost model), or force 'rebuild' / 'bypass' (LoKr bypass, LoHa
    Khatri–Rao) everywhere; `mode` picks the cost model ('eager' or 'graph' for compiled steps).
    Modules read it when they first see an input shape, so set it before the first forward."""
    if path not in POLICIES:
        raise ValueError(f"set_path_policy: path must be one of {POLICIES}, got {path!r}")
    if mode not in MODES:
        raise ValueError(f"set_path_policy: mode must be one of {sorted(MODES)}, got {mode!r}")
    _policy["path"] = path
    _policy["mode"] = mode


def path_policy() -> tuple[str, str]:
    """(path, mode) currently in force (see set_path_policy)."""
    return _policy["path"], _policy["mode"]


def _check(name: str, **dims: int | None) -> None:
    for k, v in dims.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name}: {k} must be a positive int, got {v!r}")


def choose_lokr_path(
    tokens: int,
    a: int,
    b: int,
    c: int,
    d: int,
    w2_rank: int | None = None,
    mode: str = "eager",
) -> str:
    """'bypass' or 'rebuild' for a linear LoKr with W1 (a, c), W2 (b, d) (w2_rank: low-rank W2).

    `tokens` is the number of rows the layer sees (batch × sequence). A pure function of shapes.
    """
    _check("choose_lokr_path", tokens=tokens, a=a, b=b, c=c, d=d, w2_rank=w2_rank)
    if mode not in MODES:
        raise ValueError(f"choose_lokr_path: mode must be one of {sorted(MODES)}, got {mode!r}")
    costs = lokr_linear_costs(tokens, a, b, c, d, w2_rank, mode)
    return "bypass" if costs["bypass"] < costs["rebuild"] else "rebuild"


def choose_loha_path(tokens: int, out_dim: int, in_dim: int, rank: int, mode: str = "eager") -> str:
    """'khatri_rao' or 'rebuild' (custom autograd) for a non-Tucker LoHa with rank `rank` per half.

    For a flat conv pass in_dim = I·kh·kw and tokens = batch·H_out·W_out.
    """
    _check("choose_loha_path", tokens=tokens, out_dim=out_dim, in_dim=in_dim, rank=rank)
    if mode not in MODES:
        raise ValueError(f"choose_loha_path: mode must be one of {sorted(MODES)}, got {mode!r}")
    costs = loha_linear_costs(tokens, out_dim, in_dim, rank, mode)
    return "khatri_rao" if costs["khatri_rao"] < costs["rebuild"] else "rebuild"


def select_lokr_path(tokens: int, a: int, b: int, c: int, d: int) -> str:
    """The path a linear LoKr module takes under the process policy (set_path_policy).

    The bypass applies W2 built at (b, d) (small even when low-rank), so the cost model sees a full W2.
    """
    path, mode = path_policy()
    if path != "auto":
        return path
    return choose_lokr_path(tokens, a, b, c, d, None, mode)


def select_loha_path(tokens: int, out_dim: int, in_dim: int, rank: int, conv: bool = False) -> str:
    """'khatri_rao' or 'rebuild' for a non-Tucker LoHa module under the process policy.

    The conv Khatri–Rao path keeps its N×r² middle for backward, so under 'auto' it is taken only
    when that is no larger than the rebuild's O×I·K ΔW (LoHa peak memory must not exceed the rebuild's).
    """
    path, mode = path_policy()
    if path != "auto":
        return "khatri_rao" if path == "bypass" else "rebuild"
    if conv and tokens * rank * rank > out_dim * in_dim:
        return "rebuild"
    return choose_loha_path(tokens, out_dim, in_dim, rank, mode)


__all__ = [
    "EAGER",
    "GRAPH",
    "DeviceModel",
    "choose_loha_path",
    "choose_lokr_path",
    "loha_linear_costs",
    "lokr_linear_costs",
    "path_policy",
    "select_loha_path",
    "select_lokr_path",
    "set_path_policy",
]
