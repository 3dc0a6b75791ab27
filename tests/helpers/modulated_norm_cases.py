"""The modulated LayerNorm kernel (library/anima/kernels/modulated_norm.py) against the torch path: the checks.

`python -m tests.helpers.modulated_norm_cases` (with TRITON_INTERPRET=1: Triton's CPU interpreter) runs every
kernel check on CPU tensors and prints one JSON line, {check: "ok" or the failure's last lines};
tests/anima/test_modulated_norm.py runs it in a child process (the variable must be set before Triton is
imported and must not leak into the test session) and calls the same checks on CUDA tensors where a GPU is
present. The bound the checks use is explained in that test module's docstring.
"""

from __future__ import annotations

import copy
import json
import math
import os
import traceback

import pytest
import torch
import torch.nn.functional as F

from library.anima import model as anima_model
from library.anima.kernels import modulated_norm as mn

U32 = 2.0**-24  # fp32 unit roundoff
EPS = 1e-6


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


# ----------------------------------------------------------------------------------------------- kernel checks
CASES = [  # (B, L, D, n, dtype): odd sizes, a partial backward chunk (L > 32), both half dtypes
    (2, 45, 96, 3, torch.bfloat16),
    (1, 7, 33, 1, torch.bfloat16),
    (3, 33, 200, 2, torch.float16),
    (2, 64, 2048, 3, torch.bfloat16),
    (1, 5, 2048, 1, torch.float16),
]


def case_id(b: int, seq: int, d: int, n: int, dtype: torch.dtype) -> str:
    return f"B{b} L{seq} D{d} n{n} {str(dtype).removeprefix('torch.')}"


def kernel_case(b: int, seq: int, d: int, n: int, dtype: torch.dtype, device: str) -> None:
    """Kernel and torch path are both roundings of values within the fp32 bound of the exact result, and
    differ by more than one ulp only where the bound admits more than two halves."""
    x, scale, shift, grads = inputs(b, seq, d, n, dtype, device)
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


def unused_outputs_case(device: str) -> None:
    """Outputs nobody reads get no grad, inputs that want none get none, and in-place use is refused."""
    x, scale, shift, grads = inputs(2, 9, 40, 3, torch.bfloat16, device, seed=1)
    xs = x.clone().requires_grad_()
    q, k, v = mn.modulated_layer_norm(xs, scale, shift, EPS, 3)  # scale, shift: no grad wanted
    (q.float() * grads[0].float()).sum().backward()  # k and v unused: their grads are None
    xr = x.clone().requires_grad_()
    torch_path(xr, scale, shift, 1)[0].backward(grads[0])
    assert int(ulps(xs.grad, xr.grad).max()) <= 1
    with pytest.raises(RuntimeError, match="view"):  # views of one buffer: in-place use is refused
        mn.modulated_layer_norm(x.clone().requires_grad_(), scale, shift, EPS, 2)[0].add_(1)


def _block_run(block, args, grad):
    leaves = [t.clone().requires_grad_() for t in args[:3]]
    for p in block.parameters():
        p.grad = None
    out = block(*leaves, *args[3:])
    out.backward(grad)
    return [out.detach(), *(t.grad for t in leaves), *(p.grad for p in block.parameters())]


def block_case(device: str) -> None:
    """A whole Block (bf16) with the fused path forced on.

    Against the same wiring fed by the spelled-out torch path: only the kernel's own one-ulp roundings can
    differ, so output and every grad agree to 2 bf16 ulps of the tensor's largest magnitude (observed:
    equal). Against fp64: as accurate as the plain bf16 path (LayerNorm and modulate in bf16, no autocast),
    each error within 1.5x the plain path's (observed 0.7x to 1.2x)."""
    cfg = anima_model.tiny_anima_config()
    torch.manual_seed(0)
    block = anima_model.Block(cfg).to(torch.bfloat16).to(device)
    d, seq, b, hd = cfg.model_channels, 24, 2, cfg.head_dim
    gen = torch.Generator().manual_seed(3)

    def r(*shape):
        return torch.randn(*shape, generator=gen).to(torch.bfloat16).to(device)

    rope = (r(seq, hd).float(), r(seq, hd).float())
    args = (r(b, seq, d), r(b, d), r(b, 3 * d), r(b, 6, cfg.crossattn_emb_channels), rope)
    grad = r(b, seq, d)
    plain = _block_run(block, args, grad)
    block64 = copy.deepcopy(block).double()
    args64 = [a.double() for a in args[:4]] + [tuple(t.double() for t in rope)]
    exact = _block_run(block64, args64, grad.double())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mn, "usable", lambda *a: True)
        kernel = _block_run(block, args, grad)
        mp.setattr(mn, "modulated_layer_norm", lambda x, s, sh, eps, n=1: tuple(torch_path(x, s, sh, n)))
        spelled = _block_run(block, args, grad)
    assert len(kernel) == 4 + len(list(block.parameters()))
    for i, (k, t, p, e) in enumerate(zip(kernel, spelled, plain, exact)):
        top = float(e.abs().max())
        assert float((k.float() - t.float()).abs().max()) <= 2 * 2.0**-7 * top, i
        err_k, err_p = (float((a.double() - e).abs().max()) for a in (k, p))
        assert err_k <= 1.5 * err_p, (i, err_k, err_p)


def all_checks() -> dict:
    """Every kernel check by name: a function of the device."""
    checks = {f"kernel {case_id(*c)}": (lambda dev, c=c: kernel_case(*c, dev)) for c in CASES}
    return {**checks, "unused outputs": unused_outputs_case, "block": block_case}


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit(
            "modulated_norm_cases: run with TRITON_INTERPRET=1 (the kernel runs on the CPU then)"
        )
    results = {}
    for name, fn in all_checks().items():
        try:
            fn("cpu")
            results[name] = "ok"
        except Exception:  # each failure is reported by name to the test that asserts it
            results[name] = traceback.format_exc()[-3000:]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
