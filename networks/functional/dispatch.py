"""The cost model behind the per-layer choice between the equivalent LoKr / LoHa paths (`networks.paths`).

Every path computes the same s·ΔW·x (tested to fp32 tolerance); they differ only in speed and memory.
The choice is a pure function of shapes (never of tensor values), so a module may call it once per
input shape and cache the answer: nothing here syncs with the device or breaks graph capture.

Cost model: each path is its forward and backward kernels (FLOPs, bytes moved) and its host ops per training
step, with the forward run twice (gradient checkpointing recomputes it). GPU time is the sum over kernels of
max(FLOPs / flops_per_s, bytes / bytes_per_s) + a small gap; host time is ops × a per-op overhead (Python
dispatch, launch, autograd). The GPU runs behind the host, so a layer costs max(GPU, host). In eager mode
the host side dominates at SDXL sizes (tens of µs per op); in graph mode (CUDA graphs / torch.compile) it
vanishes and only the GPU term decides. The kernel lists follow the code of each path (the fused
RebuildLinear node, KronBypassLinear, KhatriRaoLinear); rates and host op counts are fitted to
bench/bench_paths.py, and the tests check the picks against its measured winners at every SDXL and Anima
layer shape.
"""

from __future__ import annotations

from dataclasses import dataclass

ACT_BYTES = 2  # bf16 activations / compute dtype
PARAM_BYTES = 4  # fp32 factors

Kernel = tuple[float, float]  # (flops, bytes)


@dataclass(frozen=True)
class DeviceModel:
    """Achieved (not peak) rates; calibrated on an H100 against the modules themselves by
    bench/bench_paths.py (run 22, docs/benchmarks.md)."""

    flops_per_s: float = 700e12
    bytes_per_s: float = 2.8e12
    gap_s: float = 3e-6  # GPU time of a launch that moves next to nothing, and the idle gap after it
    op_overhead_s: float = 45e-6  # host per op in eager (measured ~40-55 µs on the H100 host)


EAGER = DeviceModel()
GRAPH = DeviceModel(op_overhead_s=0.0)
MODES = {"eager": EAGER, "graph": GRAPH}

# Training runs the forward of a checkpointed block twice per step (the forward, and its recompute in
# backward); the models assume it, as the trainers' SDXL and Anima defaults do.
FORWARDS_PER_STEP = 2


@dataclass(frozen=True)
class PathCost:
    """One path on one layer: its forward and backward kernels and its host ops per training step."""

    forward: list[Kernel]
    backward: list[Kernel]
    host_ops: int  # eager ops per step (forward twice + backward), from bench/bench_paths.py at small N


def kernel_seconds(kernel: Kernel, model: DeviceModel, gap: bool = True) -> float:
    """Modelled GPU time of one kernel: bound by its FLOPs or its bytes, plus the launch gap."""
    flops, nbytes = kernel
    return max(flops / model.flops_per_s, nbytes / model.bytes_per_s) + (model.gap_s if gap else 0.0)


def _cost(path: PathCost, model: DeviceModel) -> float:
    kernels = path.forward * FORWARDS_PER_STEP + path.backward
    gpu = sum(kernel_seconds(k, model) for k in kernels)
    return max(gpu, path.host_ops * model.op_overhead_s)


def _gemm(m: float, n: float, k: float) -> Kernel:
    """(m, k) @ (k, n) in the compute dtype."""
    return 2.0 * m * n * k, ACT_BYTES * (m * k + k * n + m * n)


def _ew(elems: float, bytes_per_elem: float) -> Kernel:
    return 0.0, elems * bytes_per_elem


SMALL: Kernel = (0.0, 0.0)  # a launch on a factor-sized tensor: only its gap counts


def _lokr_rebuild(n: int, a: int, b: int, c: int, d: int, w2_rank: int | None) -> PathCost:
    """RebuildLinear: ΔW = kron(W1, W2) built in the node, x·ΔWᵀ accumulated into the base output."""
    o, i = a * b, c * d
    fwd: list[Kernel] = [SMALL] * (3 if w2_rank else 2)  # factor casts (s folded into W1's)
    if w2_rank is not None:
        fwd += [_gemm(b, d, w2_rank)]
    fwd += [_ew(o * i, ACT_BYTES), _gemm(n, o, i), _ew(n * o, ACT_BYTES)]  # kron, addmm (reads y)
    bwd = [_gemm(n, i, o), _ew(n * i, ACT_BYTES), _gemm(o, i, n)]  # grad x += g·ΔW, grad ΔW = gᵀ·x
    # kron grads read grad ΔW in place, once per factor, as batched products (with their reshapes and sums)
    bwd += [_ew(o * i, ACT_BYTES)] * 2 + [SMALL] * 4
    if w2_rank is not None:
        bwd += [_gemm(b, w2_rank, d), _gemm(w2_rank, d, b)]
    bwd += [SMALL] * (3 if w2_rank else 2)  # casts back
    return PathCost(fwd, bwd, host_ops=20)


def _lokr_bypass(n: int, a: int, b: int, c: int, d: int) -> PathCost:
    """KronBypassLinear (W2 built at (b, d)) beside the base layer, added to its output."""
    o, i = a * b, c * d
    fwd: list[Kernel] = [SMALL] * 3  # W1·s, casts
    fwd += [_gemm(n * c, b, d)]  # Y = X·W2ᵀ
    fwd += [_ew(n * c * b + n * o, 2 * ACT_BYTES)]  # Z = W1·Y: a batch of tiny products, bandwidth-bound
    fwd += [_ew(n * o, 3 * ACT_BYTES)]  # y + Z
    bwd = [_ew(n * i, 3 * ACT_BYTES)]  # grad x of the base and of the branch added
    bwd += [_gemm(n * c, b, d)]  # Y recomputed
    bwd += [_gemm(a, c, n * b), _gemm(n * c, b, a)]  # grad W1, grad Y
    bwd += [_gemm(n * c, d, b), _gemm(b, d, n * c)]  # grad x, grad W2
    # the backward products permute grad Z, Y, grad Y and x into GEMM layout (copies)
    bwd += [_ew(n * o + 2 * n * c * b + n * i, 2 * ACT_BYTES)]
    bwd += [SMALL] * 3  # scaled grad, casts back
    return PathCost(fwd, bwd, host_ops=34)


def lokr_linear_costs(
    n: int, a: int, b: int, c: int, d: int, w2_rank: int | None = None, mode: str = "eager"
) -> dict[str, float]:
    """Modelled seconds per training step (forward, recompute, backward) of one LoKr branch on an
    (a·b)×(c·d) linear with N tokens, over the bare layer."""
    model = MODES[mode]
    return {
        "rebuild": _cost(_lokr_rebuild(n, a, b, c, d, w2_rank), model),
        "bypass": _cost(_lokr_bypass(n, a, b, c, d), model),
    }


def _loha_rebuild(n: int, o: int, i: int, r: int) -> PathCost:
    """RebuildLinear with LOHA_RULE: ΔW = (w1a·w1b)⊙(w2a·w2b) built in the node."""
    oi = o * i
    fwd: list[Kernel] = [SMALL] * 4  # factor casts
    fwd += [_gemm(o, i, r)] * 2 + [_ew(oi, 3 * ACT_BYTES)]  # P1, P2, P1⊙P2
    fwd += [_gemm(n, o, i), _ew(n * o, ACT_BYTES)]  # addmm into the base output
    bwd = [_gemm(n, i, o), _ew(n * i, ACT_BYTES), _gemm(o, i, n)]  # grad x, grad ΔW
    # per half: the other half's product recomputed, Ĝ⊙P, two rank-r products
    bwd += [_gemm(o, i, r), _ew(oi, 3 * ACT_BYTES), _gemm(o, r, i), _gemm(r, i, o)] * 2
    bwd += [SMALL] * 4  # casts back
    return PathCost(fwd, bwd, host_ops=25)


def _loha_khatri_rao(n: int, o: int, i: int, r: int) -> PathCost:
    """KhatriRaoLinear beside the base layer: x·(B1•B2)ᵀ·(A1∗A2)ᵀ through an N×r² middle, added to y."""
    rr = r * r
    kr_build = [_ew(o * rr, 2 * PARAM_BYTES + ACT_BYTES), _ew(i * rr, 2 * PARAM_BYTES + ACT_BYTES)]
    fwd: list[Kernel] = [SMALL] + kr_build  # w1a·s; both Khatri–Rao factors built and cast
    fwd += [_gemm(n, rr, i), _gemm(n, o, rr), _ew(n * o, 3 * ACT_BYTES)]  # middle, output, y + it
    bwd = [_ew(n * i, 3 * ACT_BYTES)]  # grad x of the base and of the branch added
    bwd += [_gemm(n, rr, i)]  # the middle recomputed
    bwd += [_gemm(n, rr, o), _gemm(o, rr, n), _gemm(n, i, rr), _gemm(rr, i, n)]
    bwd += kr_build  # rebuilt for backward
    bwd += [_ew(o * rr, 2 * PARAM_BYTES)] * 2 + [_ew(i * rr, 2 * PARAM_BYTES)] * 2  # factor-grad einsums
    bwd += [SMALL] * 10
    return PathCost(fwd, bwd, host_ops=39)


def loha_linear_costs(n: int, o: int, i: int, r: int, mode: str = "eager") -> dict[str, float]:
    """Modelled seconds per training step of one LoHa branch (rank r per half) on an O×I linear."""
    model = MODES[mode]
    return {
        "rebuild": _cost(_loha_rebuild(n, o, i, r), model),
        "khatri_rao": _cost(_loha_khatri_rao(n, o, i, r), model),
    }


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


__all__ = [
    "EAGER",
    "MODES",
    "GRAPH",
    "DeviceModel",
    "choose_loha_path",
    "choose_lokr_path",
    "kernel_seconds",
    "loha_linear_costs",
    "lokr_linear_costs",
]
