"""The Triton modulated LayerNorm (library/anima/kernels/modulated_norm.py) against the torch path.

The torch path is what CUDA autocast runs: LayerNorm of x.float() in fp32, addcmul(shift, h, 1 + scale) in
fp32 (1 + scale rounded to half first), one half-precision cast per consumer, their fp32 grads summed in
fp32. On the CPU that path is spelled out (CPU autocast keeps LayerNorm in half precision).

Both are checked against the exact result (fp64 from the same half inputs): each output must be a correct
rounding to half of some value within an fp32 error bound of the exact one. The bound is derived below from
fp32's unit roundoff u = 2^-24 and the sums' depth ((8 + 4·log2 D)·u relative to the terms, a few
thousandths of a bf16 ulp), so a half-precision rounding anywhere inside (a grad summed in bf16, 1 + scale
left unrounded) breaks it; the mutation test shows that. Kernel and torch then differ only where their fp32
values straddle a half rounding midpoint: by one ulp, in a tiny fraction of elements (asserted), further
only where the bound itself spans several halves (grad x elements far below the terms they cancel from).

Kernel tests run in Triton's CPU interpreter (TRITON_INTERPRET=1 before the kernel module is imported:
PYTHONPATH=/tmp/triton_site TRITON_INTERPRET=1 OMP_NUM_THREADS=1 python3 -m pytest -q
tests/anima/test_modulated_norm.py) or natively on a GPU (without TRITON_INTERPRET).
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from library.anima import model as anima_model
from library.anima.kernels import modulated_norm as mn

U32 = 2.0**-24  # fp32 unit roundoff
EPS = 1e-6
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if mn.triton is None:
    KERNEL_DEVICE, WHY = None, "Triton is not installed"
elif INTERPRET:
    KERNEL_DEVICE, WHY = "cpu", ""
elif torch.cuda.is_available():
    KERNEL_DEVICE, WHY = "cuda", ""
else:
    KERNEL_DEVICE, WHY = None, "no CUDA device and TRITON_INTERPRET is not 1 (the CPU interpreter is off)"
needs_kernel = pytest.mark.skipif(KERNEL_DEVICE is None, reason=WHY)
needs_cuda = pytest.mark.skipif(KERNEL_DEVICE != "cuda", reason=WHY or "the CPU interpreter is on")


# ----------------------------------------------------------------------------------------------- helpers
def torch_path(x, scale, shift, n: int) -> list[torch.Tensor]:
    """CUDA autocast's maths, spelled out: fp32 LayerNorm, fp32 addcmul, a half cast per consumer."""
    h = F.layer_norm(x.float(), (x.shape[-1],), eps=EPS)
    m = torch.addcmul(shift, h, 1 + scale)
    return [m.to(x.dtype) for _ in range(n)]


def inputs(b: int, seq: int, d: int, n: int, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, s=1.0, o=0.0):
        return (torch.randn(*shape, generator=gen) * s + o).to(dtype).to(device)

    # an offset mean (the statistics' cancellation) and scales whose 1 + scale needs rounding
    return r(b, seq, d, s=3.0, o=1.5), r(b, 1, d, s=0.7), r(b, 1, d), [r(b, seq, d) for _ in range(n)]


def run(fn, x, scale, shift, grads, n):
    """Outputs of fn and the grads of (x, scale, shift) for the given output grads."""
    leaves = [t.clone().requires_grad_() for t in (x, scale, shift)]
    ys = fn(*leaves, n)
    torch.autograd.backward(list(ys), grads)
    return [y.detach() for y in ys], [t.grad for t in leaves]


def exact_and_bounds(x, scale, shift, grads):
    """fp64 results of the half inputs and, per element, a bound on an fp32 implementation's error."""
    d, seq, n = x.shape[-1], x.shape[1], len(grads)
    k = 8 + 4 * math.log2(d)  # depth allowance of a D-term fp32 sum (pairwise, tree or per-thread + tree)
    kt = 8 + 4 * math.log2(seq * n)  # same for the token sums

    def row(t):  # mean over D
        return t.mean(-1, keepdim=True)

    def tok(t):  # sum over tokens
        return t.sum(1, keepdim=True)

    x64, s1, sh = x.double(), (1 + scale).double(), shift.double()  # 1 + scale: rounded as both paths do
    mu = row(x64)
    rstd = (row((x64 - mu) ** 2) + EPS).rsqrt()
    xh = (x64 - mu) * rstd
    e_h = k * U32 * (xh.abs() + rstd * row(x64.abs()))  # from the mean's and rstd's errors
    y = sh + xh * s1
    e_y = s1.abs() * e_h + 2 * U32 * ((xh * s1).abs() + sh.abs())
    g = sum(t.double() for t in grads)
    ga = sum(t.double().abs() for t in grads)
    gh, a = g * s1, ga * s1.abs()
    c1, cx = row(gh), row(gh * xh)
    dx = rstd * (gh - c1 - xh * cx)
    e_g = (n - 1) * U32 * ga  # the fp32 sum of the n grads
    e_gh = s1.abs() * e_g + U32 * a
    e_c1 = row(e_gh) + k * U32 * row(a)
    e_cx = row(e_gh * xh.abs() + a * e_h) + k * U32 * row(a * xh.abs())
    terms = a + c1.abs() + (xh * cx).abs()
    e_dx = rstd * (e_gh + e_c1 + e_h * cx.abs() + xh.abs() * e_cx + 3 * U32 * terms) + k * U32 * dx.abs()
    dscale = tok(g * xh)
    e_dscale = tok(e_g * xh.abs() + ga * e_h + U32 * ga * xh.abs()) + kt * U32 * tok(ga * xh.abs())
    dshift = tok(g)
    e_dshift = kt * U32 * tok(ga)
    return [(y, e_y), (dx, e_dx), (dscale, e_dscale), (dshift, e_dshift)]


def admissible(
    dtype: torch.dtype, exact: torch.Tensor, bound: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rounding is monotone, so the roundings to `dtype` of the values within `bound` of `exact` are the
    halves from round(exact - bound) to round(exact + bound)."""
    return (exact - bound).to(dtype), (exact + bound).to(dtype)


def outside(out: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor) -> int:
    """Elements of half tensor `out` that are no rounding of a value within `bound` of `exact`."""
    lo, hi = admissible(out.dtype, exact, bound)
    o = out.double()
    return int(((o < lo.double()) | (o > hi.double())).sum())


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place between two tensors of the same 16-bit float dtype."""

    def ordered(t):
        i = t.view(torch.int16).int()
        return torch.where(i < 0, -(i & 0x7FFF), i)

    return (ordered(a) - ordered(b)).abs()


def check(outs, exact_bounds, what: str) -> None:
    for name, out, (exact, bound) in zip(("y", "grad x", "grad scale", "grad shift"), outs, exact_bounds):
        assert outside(out, exact, bound) == 0, (what, name, outside(out, exact, bound), out.numel())


# ----------------------------------------------------------------------------------------------- kernel
CASES = [  # (B, L, D, n, dtype): odd sizes, a partial backward chunk (L > 32), both half dtypes
    (2, 45, 96, 3, torch.bfloat16),
    (1, 7, 33, 1, torch.bfloat16),
    (3, 33, 200, 2, torch.float16),
    (2, 64, 2048, 3, torch.bfloat16),
    (1, 5, 2048, 1, torch.float16),
]


@needs_kernel
@pytest.mark.parametrize("b,seq,d,n,dtype", CASES)
def test_kernel_and_torch_path_are_roundings_of_the_exact_result(b, seq, d, n, dtype):
    x, scale, shift, grads = inputs(b, seq, d, n, dtype, KERNEL_DEVICE)
    ys, kgrads = run(lambda *a: mn.modulated_layer_norm(*a[:3], EPS, a[3]), x, scale, shift, grads, n)
    rys, rgrads = run(torch_path, x, scale, shift, grads, n)
    assert len(ys) == n and all(y.dtype == dtype and y.shape == x.shape for y in ys)
    assert all(torch.equal(y, ys[0]) for y in ys)
    assert [g.shape for g in kgrads] == [g.shape for g in rgrads] and all(g.dtype == dtype for g in kgrads)
    bounds = exact_and_bounds(x, scale, shift, grads)
    check([rys[0], *rgrads], bounds, "torch path")  # the bound is sound for torch too
    check([ys[0], *kgrads], bounds, "kernel")
    # Where the two differ, their fp32 values straddle a rounding midpoint: by one ulp wherever the bound
    # admits at most two halves. Only where a result's ulp is below its terms' fp32 error (grad x after
    # heavy cancellation, fp16 subnormals) may they be further apart, inside the admissible range checked
    # above. A discrepancy of a few fp32 ulps crosses a midpoint with odds of about that many times
    # 2^-(24 - p) (p: the half's significand bits); allow 64 such ulps on average.
    p = 1 - round(math.log2(torch.finfo(dtype).eps))
    for name, a, r, (exact, bound) in zip(
        ("y", "grad x", "grad scale", "grad shift"), [ys[0], *kgrads], [rys[0], *rgrads], bounds
    ):
        dist = ulps(a, r)
        narrow = ulps(*admissible(dtype, exact, bound)) <= 1
        assert int(dist[narrow].max()) <= 1, name
        frac = float((dist > 0).float().mean())
        assert frac <= 64 * 2.0 ** -(24 - p), (name, frac)


def test_the_bound_catches_a_half_precision_rounding_inside():
    """The check above fails for the usual slips: consumers' grads summed in bf16, the token sums
    accumulated in bf16, 1 + scale not rounded before the product."""
    b, seq, d, n, dtype = 2, 45, 96, 3, torch.bfloat16
    x, scale, shift, grads = inputs(b, seq, d, n, dtype, "cpu")
    bounds = exact_and_bounds(x, scale, shift, grads)
    ys, rgrads = run(torch_path, x, scale, shift, grads, n)
    check([ys[0], *rgrads], bounds, "torch path")
    half_sum = grads[0] + grads[1] + grads[2]  # bf16 sums of the consumers' grads
    _, mut = run(torch_path, x, scale, shift, [half_sum], 1)
    assert outside(mut[0], *bounds[1]) > 1000  # of 8640; observed 3564
    assert outside(mut[1], *bounds[2]) > 20 and outside(mut[2], *bounds[3]) > 20  # of 192; observed 81, 96
    g = sum(t.float() for t in grads)
    h = F.layer_norm(x.float(), (d,), eps=EPS)
    acc = torch.zeros(b, 1, d, dtype=dtype)
    for i in range(seq):  # grad shift accumulated token by token in bf16
        acc = acc + g[:, i : i + 1].to(dtype)
    assert outside(acc, *bounds[3]) > 50  # of 192; observed 150
    unrounded = torch.addcmul(shift.float(), h, 1 + scale.float()).to(dtype)  # 1 + scale kept in fp32
    assert outside(unrounded, *bounds[0]) > 500  # of 8640; observed 1658


@needs_kernel
def test_unused_outputs_and_grads_not_needed():
    x, scale, shift, grads = inputs(2, 9, 40, 3, torch.bfloat16, KERNEL_DEVICE, seed=1)
    xs = x.clone().requires_grad_()
    q, k, v = mn.modulated_layer_norm(xs, scale, shift, EPS, 3)  # scale, shift: no grad wanted
    (q.float() * grads[0].float()).sum().backward()  # k and v unused: their grads are None
    xr = x.clone().requires_grad_()
    torch_path(xr, scale, shift, 1)[0].backward(grads[0])
    assert int(ulps(xs.grad, xr.grad).max()) <= 1
    with pytest.raises(RuntimeError, match="view"):  # views of one buffer: in-place use is refused
        mn.modulated_layer_norm(x.clone().requires_grad_(), scale, shift, EPS, 2)[0].add_(1)


def test_bad_arguments_are_refused():
    x = torch.zeros(1, 2, 8, dtype=torch.bfloat16)
    s = torch.zeros(1, 1, 8, dtype=torch.bfloat16)
    if mn.triton is None:
        with pytest.raises(RuntimeError, match="Triton is not installed"):
            mn.modulated_layer_norm(x, s, s, EPS)
        return
    with pytest.raises(ValueError, match="n \\(consumers\\)"):
        mn.modulated_layer_norm(x, s, s, EPS, 4)
    with pytest.raises(ValueError, match="half dtype"):
        mn.modulated_layer_norm(x.float(), s, s, EPS)


# ----------------------------------------------------------------------------------------------- the model
def test_cpu_stays_on_the_torch_path(monkeypatch):
    norm = nn.LayerNorm(8, elementwise_affine=False, eps=EPS)
    x, scale, shift, _ = inputs(1, 3, 8, 1, torch.bfloat16, "cpu")
    assert not mn.usable(x, scale, shift, norm)  # a CPU tensor
    out = anima_model.modulated_norm_inputs(norm, x, scale, shift, 3)
    ref = anima_model.modulate(norm(x), scale, shift)
    assert len(out) == 3 and all(o is out[0] for o in out) and torch.equal(out[0], ref)
    monkeypatch.setenv(mn.ENV, "off")
    assert not mn.available()
    monkeypatch.setenv(mn.ENV, "on")
    assert mn.available() is (mn.triton is not None)


def test_attention_with_separate_kv_inputs_is_the_plain_call():
    torch.manual_seed(0)
    attn = anima_model.Attention(32, 32, 2, 16)
    x = torch.randn(2, 5, 32)
    assert torch.equal(attn(x), attn(x, kv_inputs=(x, x)))
    ctx = torch.randn(2, 7, 32)
    assert torch.equal(attn(x, context=ctx), attn(x, kv_inputs=(ctx, ctx)))


def _block_run(block, args, grad):
    leaves = [t.clone().requires_grad_() for t in args[:3]]
    for p in block.parameters():
        p.grad = None
    out = block(*leaves, *args[3:])
    out.backward(grad)
    return [out.detach(), *(t.grad for t in leaves), *(p.grad for p in block.parameters())]


@needs_kernel
def test_block_with_the_kernel_forced_matches_the_torch_maths(monkeypatch):
    """A whole Block (bf16) with the fused path forced on.

    Against the same wiring fed by the spelled-out torch path: only the kernel's own one-ulp roundings can
    differ, so output and every grad agree to 2 bf16 ulps of the tensor's largest magnitude (observed:
    equal). Against fp64: as accurate as the plain bf16 path (LayerNorm and modulate in bf16, no autocast),
    each error within 1.5x the plain path's (observed 0.7x to 1.2x)."""
    cfg = anima_model.tiny_anima_config()
    torch.manual_seed(0)
    block = anima_model.Block(cfg).to(torch.bfloat16).to(KERNEL_DEVICE)
    d, seq, b, hd = cfg.model_channels, 24, 2, cfg.head_dim
    gen = torch.Generator().manual_seed(3)

    def r(*shape):
        return torch.randn(*shape, generator=gen).to(torch.bfloat16).to(KERNEL_DEVICE)

    rope = (r(seq, hd).float(), r(seq, hd).float())
    args = (r(b, seq, d), r(b, d), r(b, 3 * d), r(b, 6, cfg.crossattn_emb_channels), rope)
    grad = r(b, seq, d)
    plain = _block_run(block, args, grad)
    block64 = copy.deepcopy(block).double()
    args64 = [a.double() for a in args[:4]] + [tuple(t.double() for t in rope)]
    exact = _block_run(block64, args64, grad.double())
    monkeypatch.setattr(mn, "usable", lambda *a: True)
    kernel = _block_run(block, args, grad)
    monkeypatch.setattr(mn, "modulated_layer_norm", lambda x, s, sh, eps, n=1: tuple(torch_path(x, s, sh, n)))
    spelled = _block_run(block, args, grad)
    assert len(kernel) == 4 + len(list(block.parameters()))
    for i, (k, t, p, e) in enumerate(zip(kernel, spelled, plain, exact)):
        top = float(e.abs().max())
        assert float((k.float() - t.float()).abs().max()) <= 2 * 2.0**-7 * top, i
        err_k, err_p = (float((a.double() - e).abs().max()) for a in (k, p))
        assert err_k <= 1.5 * err_p, (i, err_k, err_p)


# ----------------------------------------------------------------------------------------------- CUDA only
def _autocast_path(norm: nn.LayerNorm, n: int):
    def fn(x, scale, shift, n_):
        with torch.autocast("cuda", dtype=x.dtype):
            h = anima_model.modulate(norm(x), scale, shift)
        assert h.dtype == torch.float32  # layer_norm is an fp32 autocast op
        return [h.to(x.dtype) for _ in range(n_)]  # what each consuming linear's autocast cast makes

    return fn


def _model_path(norm: nn.LayerNorm):
    def fn(x, scale, shift, n_):
        with torch.autocast("cuda", dtype=x.dtype):
            assert mn.usable(x, scale, shift, norm)
            return anima_model.modulated_norm_inputs(norm, x, scale, shift, n_)

    return fn


@needs_cuda
@pytest.mark.parametrize("n", [3, 1])
def test_real_shape_kernel_against_the_autocast_path(n):
    """B=2, L=4096, D=2048 under CUDA autocast: the model's kernel path against LayerNorm + modulate +
    the casts as autocast runs them; both roundings of values within the fp32 bound of the exact result,
    equal but for one-ulp midpoint straddles in a tiny fraction; the kernel is deterministic."""
    b, seq, d, dtype = 2, 4096, 2048, torch.bfloat16
    x, scale, shift, grads = inputs(b, seq, d, n, dtype, "cuda")
    norm = nn.LayerNorm(d, elementwise_affine=False, eps=EPS).cuda()
    ys, kgrads = run(_model_path(norm), x, scale, shift, grads, n)
    ys2, kgrads2 = run(_model_path(norm), x, scale, shift, grads, n)
    assert all(torch.equal(a, c) for a, c in zip([ys[0], *kgrads], [ys2[0], *kgrads2]))
    rys, rgrads = run(_autocast_path(norm, n), x, scale, shift, grads, n)
    bounds = exact_and_bounds(x, scale, shift, grads)
    check([rys[0], *rgrads], bounds, "autocast path")
    check([ys[0], *kgrads], bounds, "kernel")
    for name, a, r in zip(("y", "grad x", "grad scale", "grad shift"), [ys[0], *kgrads], [rys[0], *rgrads]):
        frac = float((ulps(a, r) > 0).float().mean())
        assert frac <= 64 * 2.0**-16, (name, frac)  # bf16: p = 8, as in the interpreter test


@needs_cuda
def test_path_choice_on_cuda(monkeypatch):
    x, scale, shift, _ = inputs(2, 16, 64, 1, torch.bfloat16, "cuda")
    norm = nn.LayerNorm(64, elementwise_affine=False, eps=EPS).cuda()
    assert not mn.usable(x, scale, shift, norm)  # no autocast: torch's maths
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert mn.usable(x, scale, shift, norm)
        assert not mn.usable(x, scale.half(), shift, norm)
        assert not mn.usable(x, scale, shift, nn.LayerNorm(64).cuda())  # affine
        compiled = torch.compile(lambda t: anima_model.modulated_norm_inputs(norm, t, scale, shift)[0],
                                 backend="eager")  # fmt: skip
        assert compiled(x).dtype == torch.float32  # traced: the torch path (fp32 until the linears cast)
        monkeypatch.setenv(mn.ENV, "off")
        assert not mn.usable(x, scale, shift, norm)
    with torch.autocast("cuda", dtype=torch.float16):
        assert not mn.usable(x, scale, shift, norm)  # the linears would cast to fp16, not x's bf16


@needs_cuda
def test_captured_in_a_cuda_graph():
    """Forward and backward replay from a CUDA graph (no host sync, torch allocations only) with the
    eager results, bit for bit."""
    x, scale, shift, grads = inputs(2, 100, 256, 3, torch.bfloat16, "cuda")
    leaves = [t.clone().requires_grad_() for t in (x, scale, shift)]

    def step():
        for t in leaves:
            t.grad = None
        ys = mn.modulated_layer_norm(*leaves, EPS, 3)
        torch.autograd.backward(list(ys), grads)
        return ys[0]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = [step().clone(), *(t.grad.clone() for t in leaves)]
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    for t in leaves:
        t.grad = None
    with torch.cuda.graph(graph):
        y = step()
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, c) for a, c in zip(eager, [y, *(t.grad for t in leaves)]))
