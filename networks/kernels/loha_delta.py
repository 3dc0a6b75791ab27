"""LoHa's ΔW = (w1a·w1b) ⊙ (w2a·w2b) and its factor grads in one Triton pass over O×I each.

In torch a LoHa layer's rebuild writes P1 = w1a·w1b and P2 = w2a·w2b, reads both to write ΔW, and its
backward writes P2 again, M1 = G⊙P2, reads M1 twice for the two grad GEMMs, then the same for P1 and M2:
about twenty passes over the O×I matrices a layer a step. Here the thin factors (O×r, r×I) are read per
tile and the products formed on chip, so the O×I traffic is one write (build) or one read of G (grads):

- build: a tile of ΔW = (A1·B1) ⊙ (A2·B2), both products accumulated in fp32, their Hadamard product
  rounded once to the factors' dtype. From fp32 factors (try_build_raw, the fused node's raw build) it
  casts them itself, s·A1 in fp32 rounded once as cast_scaled rounds it, uses those values as the products'
  operands and writes them out (the node saves them for backward): the casts' four launches a build
  disappear, and ΔW and the casts are those of casting first, bit for bit;
- grads: per tile of G, P1 and P2 recomputed in fp32, M1 = G⊙P2 and M2 = G⊙P1 in fp32, passed to the
  tensor cores in the factors' dtype as a rounded part plus the rounded rest (so only the final rounding
  of each grad remains; fp32 factors take M as it is), then the four partial products
  M1·B1ᵀ, A1ᵀ·M1, M2·B2ᵀ, A2ᵀ·M2. A program walks `chunk` tiles along I, so its grad-A partials sum over
  them in registers; the partials of each program go to their own rows of fp32 buffers, summed by torch
  afterwards in a fixed order (deterministic, no atomics) and rounded once to the factors' dtype.

fp32 factors use exact fp32 dots (input_precision "ieee"), never TF32. Triton's CPU interpreter (the
tests' way in) multiplies bf16 blocks as raw integers, so there the bf16 operands are widened to fp32
first: their products are exact in fp32 either way.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch

from networks.kernels.triton_common import ROUNDED, enabled, same_device_kind, triton

ENV = "LOHA_KERNEL"  # on (default where usable) | off: the torch path everywhere
# on (default) | off: the fused node casts the factors in launches of their own before the build kernel (the
# A/B of try_build_raw alone; LOHA_KERNEL=off switches off all the LoHa kernels)
RAW_ENV = "LOHA_RAW_CAST"
MAX_RANK = 128  # one padded rank block per tile; larger ranks would spill the registers


class Tiles(NamedTuple):
    """A launch's tiling: rows (O) and columns (I) per tile, tiles along I per grads program, warps, and
    how the grads pass 16-bit M to the tensor cores."""

    bo: int
    bi: int
    chunk: int = 1
    warps: int = 4
    split: bool = True  # grads of 16-bit factors: M as two 16-bit operands (see _operand), else one


# the interpreter runs one fixed small tiling: edge tiles and several chunks already at test sizes
INTERPRETER_TILES = Tiles(32, 32, 2, 1, True)

if triton is not None:
    import triton.language as tl

    from networks.kernels.triton_common import round_to

    @triton.jit
    def _mm(a, b, WIDEN: tl.constexpr, IEEE: tl.constexpr):
        """a·b accumulated in fp32."""
        if WIDEN:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        elif IEEE:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)

    @triton.jit
    def _load_a(ptr, ro, rr, n_out, rank):
        """Rows `ro` of an (O, R) factor, padded with zeros to the rank block."""
        mask = (ro[:, None] < n_out) & (rr[None, :] < rank)
        return tl.load(ptr + ro[:, None] * rank + rr[None, :], mask=mask, other=0.0)

    @triton.jit
    def _load_b(ptr, rr, ri, rank, n_in):
        """Columns `ri` of an (R, I) factor, padded with zeros to the rank block."""
        mask = (rr[:, None] < rank) & (ri[None, :] < n_in)
        return tl.load(ptr + rr[:, None] * n_in + ri[None, :], mask=mask, other=0.0)

    @triton.jit
    def _load_cast(ptr, rows, cols, n_rows, n_cols, cast_ptr, scale, mine, OUT: tl.constexpr,
                   CAST: tl.constexpr, SCALED: tl.constexpr, STORE: tl.constexpr):  # fmt: skip
        """A (rows, cols) block of a row-major (n_rows, n_cols) factor, padded with zeros. CAST: the fp32
        block as cast_scaled gives it in the compute dtype (times s where SCALED, in fp32, rounded once);
        STORE: that block also written to `cast_ptr`, by the one program that owns it (`mine`)."""
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        offs = rows[:, None] * n_cols + cols[None, :]
        x = tl.load(ptr + offs, mask=mask, other=0.0)
        if CAST:
            if SCALED:
                x = x * scale
            x = round_to(x, OUT).to(cast_ptr.dtype.element_ty)
            if STORE:
                tl.store(cast_ptr + offs, x, mask=mask & mine)
        return x

    @triton.jit
    def _build_kernel(a1_ptr, b1_ptr, a2_ptr, b2_ptr, out_ptr, c1_ptr, c2_ptr, c3_ptr, c4_ptr, scale, n_out,
                      n_in, rank, OUT: tl.constexpr, WIDEN: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr,
                      RP: tl.constexpr, CAST: tl.constexpr, SCALED: tl.constexpr, STORE_A1: tl.constexpr,
                      STORE_REST: tl.constexpr):  # fmt: skip
        # CAST: the factors come raw (fp32) and are cast here, each A block stored by the programs of the first
        # column of tiles, each B block by those of the first row (c*_ptr: the cast copies)
        pid_o, pid_i = tl.program_id(0), tl.program_id(1)
        ro = pid_o.to(tl.int64) * BO + tl.arange(0, BO)
        ri = pid_i.to(tl.int64) * BI + tl.arange(0, BI)
        rr = tl.arange(0, RP)
        a1 = _load_cast(a1_ptr, ro, rr, n_out, rank, c1_ptr, scale, pid_i == 0, OUT, CAST, SCALED, STORE_A1)
        b1 = _load_cast(b1_ptr, rr, ri, rank, n_in, c2_ptr, scale, pid_o == 0, OUT, CAST, False, STORE_REST)
        a2 = _load_cast(a2_ptr, ro, rr, n_out, rank, c3_ptr, scale, pid_i == 0, OUT, CAST, False, STORE_REST)
        b2 = _load_cast(b2_ptr, rr, ri, rank, n_in, c4_ptr, scale, pid_o == 0, OUT, CAST, False, STORE_REST)
        p1 = _mm(a1, b1, WIDEN, OUT == 2)
        p2 = _mm(a2, b2, WIDEN, OUT == 2)
        delta = round_to(p1 * p2, OUT)
        mask = (ro[:, None] < n_out) & (ri[None, :] < n_in)
        tl.store(out_ptr + ro[:, None] * n_in + ri[None, :], delta.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _operand(m, OUT: tl.constexpr, DT: tl.constexpr, LOW: tl.constexpr):
        """fp32 M as a tensor-core operand in DT: its rounding, or (LOW) what that rounding left out,
        rounded in turn; the two sum to M within 2⁻¹⁶ of |M| for bf16, so M·B has the error of an fp32 M."""
        hi = round_to(m, OUT)
        if LOW:
            return round_to(m - hi, OUT).to(DT)
        return hi.to(DT)

    @triton.jit
    def _half_grads(m, a, b, acc, pb_ptr, rr, ri, rank, n_in, NEED_A: tl.constexpr, NEED_B: tl.constexpr,
                    OUT: tl.constexpr, WIDEN: tl.constexpr, SPLIT: tl.constexpr):  # fmt: skip
        """One half's share of a tile, M (fp32) = G⊙(the other half's product): M·Bᵀ added to the grad-A
        accumulator, Aᵀ·M stored as this row block's grad-B partial (`pb_ptr` at the block's (r, I) slice).
        16-bit factors take M as a 16-bit operand, split in two (SPLIT) or rounded once."""
        ieee: tl.constexpr = OUT == 2
        hi = _operand(m, OUT, a.dtype, False)
        if SPLIT:
            lo = _operand(m, OUT, a.dtype, True)
        if NEED_A:
            acc += _mm(hi, tl.trans(b), WIDEN, ieee)
            if SPLIT:
                acc += _mm(lo, tl.trans(b), WIDEN, ieee)
        if NEED_B:
            part = _mm(tl.trans(a), hi, WIDEN, ieee)
            if SPLIT:
                part += _mm(tl.trans(a), lo, WIDEN, ieee)
            mask = (rr[:, None] < rank) & (ri[None, :] < n_in)
            tl.store(pb_ptr + rr[:, None] * n_in + ri[None, :], part, mask=mask)
        return acc

    @triton.jit
    def _grads_kernel(g_ptr, sg0, sg1, a1_ptr, b1_ptr, a2_ptr, b2_ptr, pa1_ptr, pb1_ptr, pa2_ptr, pb2_ptr,
                      n_out, n_in, rank, NEED_A1: tl.constexpr, NEED_B1: tl.constexpr, NEED_A2: tl.constexpr,
                      NEED_B2: tl.constexpr, OUT: tl.constexpr, WIDEN: tl.constexpr, BO: tl.constexpr,
                      BI: tl.constexpr, RP: tl.constexpr, CHUNK: tl.constexpr,
                      SPLIT: tl.constexpr):  # fmt: skip
        # program (row block o, chunk c): rows o·BO.., tiles c·CHUNK.. along I
        pid_o = tl.program_id(0).to(tl.int64)
        pid_c = tl.program_id(1).to(tl.int64)
        ro = pid_o * BO + tl.arange(0, BO)
        rr = tl.arange(0, RP)
        half1: tl.constexpr = NEED_A1 or NEED_B1
        half2: tl.constexpr = NEED_A2 or NEED_B2
        ieee: tl.constexpr = OUT == 2
        a1 = _load_a(a1_ptr, ro, rr, n_out, rank)
        a2 = _load_a(a2_ptr, ro, rr, n_out, rank)
        acc1 = tl.zeros((BO, RP), dtype=tl.float32)
        acc2 = tl.zeros((BO, RP), dtype=tl.float32)
        for t in range(CHUNK):
            ri = (pid_c * CHUNK + t) * BI + tl.arange(0, BI)
            mask = (ro[:, None] < n_out) & (ri[None, :] < n_in)
            g = tl.load(g_ptr + ro[:, None] * sg0 + ri[None, :] * sg1, mask=mask, other=0.0).to(tl.float32)
            b1 = _load_b(b1_ptr, rr, ri, rank, n_in)
            b2 = _load_b(b2_ptr, rr, ri, rank, n_in)
            if half1:  # M1 = G⊙P2
                acc1 = _half_grads(g * _mm(a2, b2, WIDEN, ieee), a1, b1, acc1, pb1_ptr + pid_o * rank * n_in,
                                   rr, ri, rank, n_in, NEED_A1, NEED_B1, OUT, WIDEN, SPLIT)  # fmt: skip
            if half2:  # M2 = G⊙P1
                acc2 = _half_grads(g * _mm(a1, b1, WIDEN, ieee), a2, b2, acc2, pb2_ptr + pid_o * rank * n_in,
                                   rr, ri, rank, n_in, NEED_A2, NEED_B2, OUT, WIDEN, SPLIT)  # fmt: skip
        amask = (ro[:, None] < n_out) & (rr[None, :] < rank)
        offs = pid_c * n_out * rank + ro[:, None] * rank + rr[None, :]
        if NEED_A1:
            tl.store(pa1_ptr + offs, acc1, mask=amask)
        if NEED_A2:
            tl.store(pa2_ptr + offs, acc2, mask=amask)


def usable(
    grad: torch.Tensor | None, factors: Sequence[torch.Tensor], dtype: torch.dtype | None = None
) -> bool:
    """Whether a LoHa build (grad None) or grads call takes the kernel: Triton importable, LOHA_KERNEL not
    off, not under torch.compile; four 2-D factors (O, r), (r, I), (O, r), (r, I) with r ≤ MAX_RANK and a
    grad (O, I), all of one dtype in ROUNDED, on CUDA (or the CPU under the interpreter). Not while autograd
    records through the factors (the kernel's output has no graph), nor under an autocast to another dtype
    (torch's path would compute in that dtype). `dtype`: a build that casts contiguous fp32 factors to this
    compute dtype itself (try_build_raw); None: the factors' own."""
    if len(factors) != 4 or not enabled(ENV):
        return False
    w1a, w1b, w2a, w2b = factors
    tensors = [*factors] if grad is None else [*factors, grad]
    own = w1a.dtype
    if dtype is None:
        dtype = own
    elif own != torch.float32 or not all(f.is_contiguous() for f in factors):
        return False  # a cast of a strided factor keeps its strides: not what the kernel writes
    if dtype not in ROUNDED or any(t.dtype != own or t.dim() != 2 for t in tensors):
        return False
    if w1a.shape != w2a.shape or w1b.shape != w2b.shape or w1a.shape[1] != w1b.shape[0]:
        return False
    if not 1 <= w1a.shape[1] <= MAX_RANK or (grad is not None and grad.shape != (w1a.shape[0], w1b.shape[1])):
        return False
    if not same_device_kind(tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    kind = tensors[0].device.type
    return not (torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) != dtype)


# From this many weights (O·I) up the grads pass beat torch's on an H100 (session 11, bf16, r 32: 1280×10240,
# 8192×2048 and 2048×8192 were 3–17 % faster); at 640×640 … 2048×2048 and 1280×5120 it was 1–19 % slower,
# its fp32 partials costing more than the passes it saves. The build pass was faster at every shape.
GRADS_MIN_WEIGHTS = 1 << 23


def grads_pays(out_dim: int, in_dim: int, device_type: str) -> bool:
    """Whether hada_grads takes the grads kernel for an (out_dim, in_dim) ΔW: on CUDA from GRADS_MIN_WEIGHTS
    weights up; always under the interpreter (the tests' CPU runs)."""
    return device_type != "cuda" or out_dim * in_dim >= GRADS_MIN_WEIGHTS


def _rank_block(r: int) -> int:
    """The rank padded to a power of two ≥ 16 (what tl.dot takes)."""
    return max(16, triton.next_power_of_2(r))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def build_tiles(o: int, i: int, device: torch.device) -> Tiles:
    """The build's tiling: the interpreter's fixed one, else 64×128 tiles (a 16 KB bf16 store each)."""
    if device.type != "cuda":
        return INTERPRETER_TILES
    return Tiles(64, 128, 1, 4)


def grads_tiles(o: int, i: int, device: torch.device) -> Tiles:
    """The grads' tiling. Taller tiles halve the grad-B partials (4·r/BO bytes per weight per half);
    longer chunks shrink the grad-A ones, as long as about two programs per SM remain."""
    if device.type != "cuda":
        return INTERPRETER_TILES
    bo, bi = (128, 64) if o >= 2048 else (64, 64)
    tiles = triton.cdiv(o, bo) * triton.cdiv(i, bi)
    chunk = max(1, min(8, tiles // (2 * _sm_count(device.index or 0))))
    return Tiles(bo, bi, chunk, 8 if bo == 128 else 4)


def _checked(name: str, grad: torch.Tensor | None, factors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if triton is None:
        raise RuntimeError(f"loha_delta.{name}: Triton is not installed")
    if not usable(grad, factors):
        shapes = [tuple(f.shape) for f in factors]
        raise ValueError(
            f"loha_delta.{name}: factors {shapes} ({factors[0].dtype}) are not ones the kernel takes"
        )
    return [f.contiguous() for f in factors]


def build(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
          tiles: Tiles | None = None) -> torch.Tensor:  # fmt: skip
    """(w1a·w1b) ⊙ (w2a·w2b) as (O, I) in the factors' dtype, rounded once."""
    return _build(*_checked("build", None, (w1a, w1b, w2a, w2b)), tiles)


def try_build(factors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The kernel's ΔW where `usable` takes the factors, else None (the caller runs torch's path); one check."""
    if not usable(None, factors):
        return None
    return _build(*[f.contiguous() for f in factors])


def try_build_raw(
    factors: Sequence[torch.Tensor], dtype: torch.dtype, scale: float
) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
    """From fp32 factors: (ΔW, the factors cast to `dtype` with s on w1a), bit for bit what cast_scaled of each
    and `try_build` of those give, in one launch; None where `usable` does not take the call. A factor that
    cast_scaled would hand back as it is (fp32 compute dtype, s = 1 off w1a) comes back as it is. Also None
    with LOHA_RAW_CAST=off."""
    if (
        not (enabled(RAW_ENV) and usable(None, factors, dtype))
        or factors[0].shape[0] == 0
        or factors[1].shape[1] == 0
    ):
        return None  # (an empty ΔW launches nothing, so nothing would write the casts)
    w1a, w1b, w2a, w2b = factors
    same = dtype == w1a.dtype
    cast = [f if same and (k > 0 or scale == 1.0) else torch.empty_like(f, dtype=dtype)
            for k, f in enumerate(factors)]  # fmt: skip
    return _build(w1a, w1b, w2a, w2b, cast=(cast, scale)), cast


def _build(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor, tiles: Tiles | None = None,
           cast: tuple[list[torch.Tensor], float] | None = None) -> torch.Tensor:  # fmt: skip
    """ΔW from factors in the compute dtype, or (`cast`: the targets of their casts, s) from fp32 factors that
    the kernel casts, writing the targets that are not the factors themselves."""
    targets, scale = cast if cast is not None else ([w1a] * 4, 1.0)
    dtype = targets[0].dtype
    (o, r), i = w1a.shape, w1b.shape[1]
    out = torch.empty(o, i, dtype=dtype, device=w1a.device)
    if out.numel() == 0:
        return out
    t = tiles or build_tiles(o, i, w1a.device)
    grid = (triton.cdiv(o, t.bo), triton.cdiv(i, t.bi))
    stores = [c is not f for c, f in zip(targets, (w1a, w1b, w2a, w2b))] if cast is not None else [False] * 4
    _build_kernel[grid](w1a, w1b, w2a, w2b, out, *targets, scale, o, i, r, OUT=ROUNDED.index(dtype),
                        WIDEN=_widen(out), BO=t.bo, BI=t.bi, RP=_rank_block(r), CAST=cast is not None,
                        SCALED=scale != 1.0, STORE_A1=stores[0], STORE_REST=stores[1],
                        num_warps=t.warps)  # fmt: skip
    return out


def _widen(t: torch.Tensor) -> bool:
    # the interpreter's tl.dot reads bf16 blocks as integers (see the module docstring)
    return t.dtype == torch.bfloat16 and t.device.type == "cpu"


def grads(grad: torch.Tensor, w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
          need: Sequence[bool], tiles: Tiles | None = None) -> list[torch.Tensor | None]:  # fmt: skip
    """Grads of Σ grad⊙ΔW to (w1a, w1b, w2a, w2b) in their dtype, None where `need` is False."""
    return _grads(grad, *_checked("grads", grad, (w1a, w1b, w2a, w2b)), need, tiles)


def try_grads(
    grad: torch.Tensor, factors: Sequence[torch.Tensor], need: Sequence[bool]
) -> list[torch.Tensor | None] | None:
    """The kernel's factor grads where `usable` takes the call and `grads_pays` for its size, else None (the
    caller runs torch's path); one check."""
    if not (usable(grad, factors) and grads_pays(*grad.shape, grad.device.type)):
        return None
    return _grads(grad, *[f.contiguous() for f in factors], need)


def _grads(grad: torch.Tensor, w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
           need: Sequence[bool], tiles: Tiles | None = None) -> list[torch.Tensor | None]:  # fmt: skip
    need = [bool(n) for n in need]
    (o, r), i = w1a.shape, w1b.shape[1]
    out: list[torch.Tensor | None] = [None] * 4
    if not any(need):
        return out
    if grad.numel() == 0:
        return [torch.zeros_like(f) if n else None for f, n in zip((w1a, w1b, w2a, w2b), need)]
    t = tiles or grads_tiles(o, i, grad.device)
    n_o, n_c = triton.cdiv(o, t.bo), triton.cdiv(triton.cdiv(i, t.bi), t.chunk)
    dev, f32 = grad.device, torch.float32
    # partials of unneeded grads are never written: the grad stands in for their pointers
    pa1 = torch.empty(n_c, o, r, dtype=f32, device=dev) if need[0] else grad
    pb1 = torch.empty(n_o, r, i, dtype=f32, device=dev) if need[1] else grad
    pa2 = torch.empty(n_c, o, r, dtype=f32, device=dev) if need[2] else grad
    pb2 = torch.empty(n_o, r, i, dtype=f32, device=dev) if need[3] else grad
    _grads_kernel[(n_o, n_c)](grad, grad.stride(0), grad.stride(1), w1a, w1b, w2a, w2b, pa1, pb1, pa2, pb2,
                              o, i, r, NEED_A1=need[0], NEED_B1=need[1], NEED_A2=need[2], NEED_B2=need[3],
                              OUT=ROUNDED.index(w1a.dtype), WIDEN=_widen(w1a), BO=t.bo, BI=t.bi,
                              RP=_rank_block(r), CHUNK=t.chunk, SPLIT=t.split and w1a.dtype != torch.float32,
                              num_warps=t.warps)  # fmt: skip
    for k, part in enumerate((pa1, pb1, pa2, pb2)):
        if need[k]:
            out[k] = part.sum(0).to(w1a.dtype)
    return out
