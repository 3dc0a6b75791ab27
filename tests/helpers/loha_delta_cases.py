"""The LoHa kernel's cases (networks/kernels/loha_delta.py), measured against an fp64 reference.

`python -m tests.helpers.loha_delta_cases` runs them under Triton's interpreter (run by
tests/networks/test_loha_delta_kernel.py in a child process) and prints one JSON line; the CUDA tests call
`measure` and `failures` directly at the real shapes.

Every error is relative to the reference's largest magnitude. The fp64 reference starts from the same
rounded inputs, so what it measures is the arithmetic: fp32 results within 1e-5 (fp32 sums of r or I
terms), 16-bit results within one rounding of each element (`excess`: how far any element lies beyond
u·|ref|, u = 2⁻⁸ for bf16, 2⁻¹¹ for fp16) and no worse than torch's path, which rounds two or three times.
"""

from __future__ import annotations

import json

import torch

from networks.functional.loha import hada_delta, hada_grads
from networks.kernels import loha_delta
from networks.kernels.triton_common import switched_off

UNIT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # half the spacing of 1.0's neighbours
FP32_TOL = 1e-5
# beyond one rounding, a 16-bit result carries the fp32 sums' error and (grads) M's two parts' (2⁻¹⁶ of M for
# bf16): allowed a sixteenth of the unit, far below the further roundings of torch's path
EXCESS_FRACTION = 1 / 16
NAMES = ("delta", "w1a", "w1b", "w2a", "w2b")


def torch_path():
    """LOHA_KERNEL=off for the block: hada_delta/hada_grads run today's torch code."""
    return switched_off(loha_delta.ENV)


def inputs(o: int, i: int, r: int, dtype: torch.dtype, device: str, seed: int = 0) -> list[torch.Tensor]:
    """w1a, w1b, w2a, w2b and a grad ΔW in `dtype`; factors ~ N(0, 1/r) so the products stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(o, r), (r, i), (o, r), (r, i), (o, i)]
    scales = [r**-0.5, 1.0, r**-0.5, 1.0, 1.0]
    return [
        (torch.randn(s, generator=gen) * k).to(device=device, dtype=dtype) for s, k in zip(shapes, scales)
    ]


def reference(factors: list[torch.Tensor], grad: torch.Tensor) -> list[torch.Tensor]:
    """ΔW and the four grads in fp64, from the formulas."""
    a1, b1, a2, b2 = (f.double() for f in factors)
    g = grad.double()
    p1, p2 = a1 @ b1, a2 @ b2
    m1, m2 = g * p2, g * p1
    return [p1 * p2, m1 @ b1.T, a1.T @ m1, m2 @ b2.T, a2.T @ m2]


def errors(out: torch.Tensor, ref: torch.Tensor, unit: float) -> dict:
    """max and rms error relative to max|ref| and ‖ref‖, and the excess over one rounding."""
    diff = (out.double() - ref).abs()
    top = ref.abs().max().item()
    return {"max": diff.max().item() / top, "rms": (diff.norm() / ref.norm()).item(),
            "excess": (diff - unit * ref.abs()).max().item() / top}  # fmt: skip


def measure(o: int, i: int, r: int, dtype: torch.dtype, device: str, grad_transposed: bool = False) -> dict:
    """Kernel and torch path against fp64 for one shape; `grad_transposed` hands the kernel a strided grad."""
    *factors, grad = inputs(o, i, r, dtype, device)
    if grad_transposed:
        grad = grad.T.contiguous().T
    ref = reference(factors, grad)
    kernel = [loha_delta.build(*factors), *loha_delta.grads(grad, *factors, [True] * 4)]
    again = [loha_delta.build(*factors), *loha_delta.grads(grad, *factors, [True] * 4)]
    with torch_path():
        plain = [hada_delta(factors), *hada_grads(grad, factors, [True] * 4)]
    unit = UNIT.get(dtype, 0.0)
    return {
        "case": f"{o}x{i} r={r} {str(dtype)[6:]}{' strided grad' if grad_transposed else ''}",
        "dtype": str(dtype)[6:],
        "kernel": {n: errors(k, f, unit) for n, k, f in zip(NAMES, kernel, ref)},
        "torch": {n: errors(p, f, unit) for n, p, f in zip(NAMES, plain, ref)},
        "deterministic": all(torch.equal(a, b) for a, b in zip(kernel, again)),
        "dtypes_shapes": all(k.dtype == dtype and k.shape == f.shape for k, f in zip(kernel, ref)),
        "_outputs": (kernel, ref),
    }


def failures(case: dict) -> list[str]:
    """The bounds a case breaks (empty: it passes)."""
    bad = []
    tol = EXCESS_FRACTION * UNIT.get(getattr(torch, case["dtype"]), 0.0)
    if not (case["deterministic"] and case["dtypes_shapes"]):
        bad.append("determinism or dtype/shape")
    for name in NAMES:
        k, t = case["kernel"][name], case["torch"][name]
        if case["dtype"] == "float32":
            if k["max"] > FP32_TOL:
                bad.append(f"{name}: max {k['max']:.2e} > {FP32_TOL}")
        elif k["excess"] > tol or k["rms"] > t["rms"] or k["max"] > t["max"] + tol:
            bad.append(f"{name}: kernel {k} vs torch {t}")
    return bad


def mutations(case: dict) -> dict:
    """Whether `failures` catches a broken result: the edge tile's last row or column lost, the halves'
    grads swapped (M1 and M2 exchanged)."""
    kernel, ref = case["_outputs"]
    unit = UNIT.get(kernel[0].dtype, 0.0)

    def caught(outs: list[torch.Tensor]) -> bool:
        errs = {n: errors(k, f, unit) for n, k, f in zip(NAMES, outs, ref)}
        return bool(failures({**case, "kernel": errs}))

    row, col = kernel[0].clone(), kernel[0].clone()
    row[-1] = 0
    col[:, -1] = 0
    swapped = [kernel[0], kernel[3], kernel[4], kernel[1], kernel[2]]
    return {"edge_row": caught([row, *kernel[1:]]), "edge_col": caught([col, *kernel[1:]]),
            "halves_swapped": caught(swapped)}  # fmt: skip


def need_subsets(device: str) -> list[dict]:
    """grads with some factors not needed: None there, the full call's bits elsewhere."""
    *factors, grad = inputs(77, 130, 8, torch.bfloat16, device, seed=1)
    full = loha_delta.grads(grad, *factors, [True] * 4)
    out = []
    for need in ([1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 0, 0]):
        got = loha_delta.grads(grad, *factors, [bool(n) for n in need])
        ok = all((g is None) if not n else torch.equal(g, f) for g, f, n in zip(got, full, need))
        out.append({"need": need, "ok": ok})
    return out


def usable_cases(device: str) -> dict:
    """What usable() says about calls it must refuse, and one it must take."""
    *f, grad = inputs(8, 12, 4, torch.float32, device)
    big = inputs(8, 12, 129, torch.float32, device)
    cases = {
        "plain": loha_delta.usable(grad, f),
        "build": loha_delta.usable(None, f),
        "mixed_dtype": loha_delta.usable(grad.bfloat16(), f),
        "fp64": loha_delta.usable(None, [t.double() for t in f]),
        "rank_129": loha_delta.usable(None, big[:4]),
        "grad_shape": loha_delta.usable(grad[:, :-1], f),
        "three_d": loha_delta.usable(None, [f[0][None], *f[1:]]),
        "halves_differ": loha_delta.usable(None, [f[0], f[1], f[0][:, :2], f[1][:2]]),
        "records_autograd": loha_delta.usable(None, [f[0].requires_grad_(), *f[1:]]),
    }
    with torch.no_grad():
        cases["no_grad"] = loha_delta.usable(None, f)
    f[0].requires_grad_(False)
    with torch.autocast(device, dtype=torch.bfloat16):
        cases["autocast_other_dtype"] = loha_delta.usable(None, f)
    with torch_path():
        cases["switched_off"] = loha_delta.usable(None, f)
    return cases


SHAPES = [(77, 130, 4), (77, 130, 8), (77, 130, 32), (77, 130, 48), (64, 96, 16)]


def main() -> None:
    results = [measure(o, i, r, dt, "cpu") for dt in (torch.float32, torch.bfloat16, torch.float16)
               for o, i, r in SHAPES]  # fmt: skip
    results.append(measure(77, 130, 8, torch.bfloat16, "cpu", grad_transposed=True))
    report = {
        "cases": [
            {k: v for k, v in c.items() if k != "_outputs"} | {"failures": failures(c)} for c in results
        ],
        "mutations": [mutations(c) for c in results if c["case"].startswith("77x130 r=8 ")],
        "need": need_subsets("cpu"),
        "usable": usable_cases("cpu"),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
