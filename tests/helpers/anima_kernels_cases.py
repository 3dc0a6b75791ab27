"""The Anima kernels (library/anima/kernels) against the torch path: the comparisons the tests make.

`python -m tests.helpers.anima_kernels_cases` (with TRITON_INTERPRET=1: Triton's CPU interpreter) runs every
CPU case, the mutations and the whole-block comparison and prints one JSON line; tests/anima/
test_anima_kernels.py runs it in a child process (the variable must be set before Triton is imported) and
calls the same functions on CUDA tensors where a GPU is present.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import textwrap

import torch

U24 = 2.0**-24  # fp32 unit roundoff
UNIT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # unit roundoff of the 16-bit dtypes


@contextlib.contextmanager
def kernels(on: bool):
    """ANIMA_KERNELS=on|off for the calls inside (read at every call)."""
    old = os.environ.get("ANIMA_KERNELS")
    os.environ["ANIMA_KERNELS"] = "on" if on else "off"
    try:
        yield
    finally:
        if old is None:
            del os.environ["ANIMA_KERNELS"]
        else:
            os.environ["ANIMA_KERNELS"] = old


def same_bits(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Equal dtype, shape and every bit (so −0 and +0 differ; NaN payloads would too)."""
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


def _plant_zeros(t: torch.Tensor) -> torch.Tensor:
    """Rows of +0 and −0 and a mixed row, so the sign of zero results is tested (−0 + +0 = +0)."""
    t = t.clone()
    flat = t.view(-1, t.shape[-1])
    flat[0] = 0.0
    if flat.shape[0] > 1:
        flat[1] = -0.0
    if flat.shape[0] > 2:
        flat[2, ::2] = -0.0
    return t


def rope_case(shape: tuple[int, int, int, int], dtype: torch.dtype, device: str, seed: int = 0,
              layout: str = "model", table: str = "fp32") -> dict:  # fmt: skip
    """apply_rope forward and grad x, kernel against torch path. shape (B, heads, L, hd); layout "model" is
    the transpose of a (B, L, heads, hd) buffer (as in Attention), "contiguous" a (B, heads, L, hd) one;
    table "fp32" passes the fp32 (L, hd) table as the DiT does, "cast" a (1, 1, L, hd) one already in
    dtype as the adapter does."""
    from library.anima import layers

    gen = torch.Generator().manual_seed(seed)
    bsz, heads, length, hd = shape
    if layout == "model":
        base = torch.randn(bsz, length, heads, hd, generator=gen) * 3
        x0 = _plant_zeros(base).to(dtype).to(device).transpose(1, 2)
    else:
        x0 = _plant_zeros(torch.randn(shape, generator=gen) * 3).to(dtype).to(device)
    ang = torch.randn(length, hd // 2, generator=gen, dtype=torch.float64) * 20
    ang = torch.cat([ang, ang], dim=-1)
    cos, sin = (t.float().to(device) for t in (ang.cos(), ang.sin()))
    if table == "cast":
        cos, sin = (t.to(dtype)[None, None] for t in (cos, sin))
    g = _plant_zeros(torch.randn(bsz, heads, length, hd, generator=gen)).to(dtype).to(device)
    got = {}
    for on in (True, False):
        x = x0.detach().requires_grad_()
        with kernels(on):
            y = layers.apply_rope(x, cos, sin)
        y.backward(g)
        got[on] = (y, x.grad, type(y.grad_fn).__name__)
    (yk, gk, fk), (yt, gt, ft) = got[True], got[False]
    return {"case": f"rope {shape} {dtype} {device} {layout} {table}", "forward": same_bits(yk, yt),
            "grad_x": same_bits(gk, gt), "kernel_fn": fk, "torch_fn": ft,
            "layout_kept": yk.stride() == yt.stride() or heads == 1}  # fmt: skip


def _gate_tolerance(k: torch.Tensor, t: torch.Tensor, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """How far two fp32 sums of the same L terms p (in any two orders), each rounded once to dtype, can
    be apart: each fp32 sum is within γ(L−1)·Σ|p| of the exact one, each rounding within u·|sum|."""
    n = p.shape[1] - 1
    gamma = n * U24 / (1 - n * U24)
    u = UNIT[dtype]
    return 2 * gamma * p.abs().sum(1, keepdim=True) + u / (1 - u) * (k.double().abs() + t.double().abs())


def residual_case(shape: tuple[int, int, int], dtype: torch.dtype, device: str, seed: int = 0,
                  integers: bool = False, need: str = "xgo") -> dict:  # fmt: skip
    """gated_residual forward and grads, kernel against torch path; gate a (B, 1, D) view of a (B, 3D)
    chunk as in Block. integers: small-integer g and out, so every fp32 sum is exact and gate's grad
    must be bitwise too. need: which of x, gate, out require grad."""
    from library.anima import layers

    gen = torch.Generator().manual_seed(seed)
    bsz, length, dim = shape

    def draw(*s: int) -> torch.Tensor:
        if integers:
            return torch.randint(-4, 5, s, generator=gen).float()
        return torch.randn(*s, generator=gen)

    x0 = _plant_zeros(torch.randn(bsz, length, dim, generator=gen)).to(dtype).to(device)
    out0 = _plant_zeros(draw(bsz, length, dim)).to(dtype).to(device)
    gate0 = draw(bsz, 3 * dim).to(dtype).to(device)[:, None, dim : 2 * dim]
    g = _plant_zeros(draw(bsz, length, dim)).to(dtype).to(device)
    got = {}
    for on in (True, False):
        x, gate, out = (t.detach().requires_grad_(c in need) for t, c in zip((x0, gate0, out0), "xgo"))
        with kernels(on):
            y = layers.gated_residual(x, gate, out)
        y.backward(g)
        got[on] = (y, x.grad, gate.grad, out.grad, type(y.grad_fn).__name__)
    k, t = got[True], got[False]
    res = {"case": f"residual {shape} {dtype} {device} integers={integers} need={need}",
           "forward": same_bits(k[0], t[0]), "grad_x": same_bits(k[1], t[1]),
           "grad_out": same_bits(k[3], t[3]), "grad_gate_bitwise": same_bits(k[2], t[2]),
           "kernel_fn": k[4], "torch_fn": t[4], "gate_excess": 0.0, "gate_differing": 0}  # fmt: skip
    if k[2] is not None and t[2] is not None:
        p = (g * out0).double()  # torch's rounded products, exactly
        tol = _gate_tolerance(k[2], t[2], p, dtype)
        res["gate_excess"] = ((k[2].double() - t[2].double()).abs() / tol).max().item()
        res["gate_differing"] = int((k[2] != t[2]).sum())
    return res


def _all_rope_cases(device: str) -> list[dict]:
    cases = []
    for dtype in (torch.bfloat16, torch.float16):
        cases += [rope_case((2, 4, 37, 128), dtype, device), rope_case((1, 3, 7, 12), dtype, device, seed=1),
                  rope_case((2, 2, 9, 40), dtype, device, seed=2, layout="contiguous"),
                  rope_case((1, 2, 11, 96), dtype, device, seed=3, table="cast")]  # fmt: skip
    return cases


def _all_residual_cases(device: str) -> list[dict]:
    cases = []
    for dtype in (torch.bfloat16, torch.float16):
        cases += [residual_case((2, 70, 256), dtype, device), residual_case((1, 5, 33), dtype, device, 1),
                  residual_case((3, 129, 130), dtype, device, 2, integers=True),
                  residual_case((2, 40, 64), dtype, device, 3, need="go"),
                  residual_case((2, 40, 64), dtype, device, 4, need="xo")]  # fmt: skip
    return cases


# ----------------------------------------------------------------------------------------------- mutations
MUTATIONS = {  # name: (kernel module, kernel, source text, its replacement)
    # the rotation's partner one element early: x[j + hd/2 − 1] instead of x[j + hd/2]
    "rope_rotate_off_by_one": ("rope", "_rope_kernel", "a2 = tl.load(x_ptr + xo + HALF,",
                               "a2 = tl.load(x_ptr + xo + HALF - 1,"),
    # backward without autograd's +0 padding: a −0 sum stays −0
    "rope_no_zero_sign": ("rope", "_rope_kernel", "y1 = tl.where(y1 == 0.0, 0.0, y1)", "y1 = y1"),
    # the product x1·c1 not rounded before the sum
    "rope_one_rounding_dropped": ("rope", "_rope_kernel", "y1 = round_to(round_to(a1 * c1, DTYPE) - ",
                                  "y1 = round_to((a1 * c1) - "),
    # gate·out not rounded before the sum
    "residual_one_rounding_dropped": ("residual", "_residual_kernel",
                                      "y = round_to(a + round_to(gate * o.to(tl.float32), DTYPE), DTYPE)",
                                      "y = round_to(a + gate * o.to(tl.float32), DTYPE)"),
    # gate's grad misses the first token of every tile
    "residual_gate_drops_a_token": ("residual", "_residual_kernel", "round_to(a * o.to(tl.float32), DTYPE)",
                                    "round_to(a * o.to(tl.float32), DTYPE) * (l % BLOCK_L > 0)[:, None]"),
}  # fmt: skip


@contextlib.contextmanager
def mutated_kernel(name: str):
    """One kernel with the source edit MUTATIONS[name] for the calls inside; Triton's interpreter only
    (there a kernel is its Python function, rebuilt here from the edited source)."""
    import importlib

    module_name, kernel, old, new = MUTATIONS[name]
    module = importlib.import_module(f"library.anima.kernels.{module_name}")
    src = textwrap.dedent(inspect.getsource(getattr(module, kernel).fn))
    if old not in src:
        raise RuntimeError(f"mutation {name}: {old!r} is not in {kernel}'s source")
    scope = dict(vars(module))
    exec(compile(src.replace(old, new), f"<mutated {name}>", "exec"), scope)  # noqa: S102
    original = getattr(module, kernel)
    setattr(module, kernel, scope[kernel])
    try:
        yield
    finally:
        setattr(module, kernel, original)


def case_passes(c: dict) -> bool:
    """Every output bitwise, gate's grad within its tolerance and bitwise where the sums are exact."""
    exact = ("forward", "grad_x") + (("grad_out",) if "grad_out" in c else ())
    integers = "integers=True" in c["case"]
    gate_ok = c.get("gate_excess", 0.0) <= 1.0 and (c.get("grad_gate_bitwise", True) or not integers)
    return all(c[k] for k in exact) and gate_ok


def mutations_caught() -> dict[str, bool]:
    """Per mutation: whether some CPU case of its kernel fails (each must)."""
    caught = {}
    for name, (module_name, *_) in MUTATIONS.items():
        with mutated_kernel(name):
            cases = _all_rope_cases("cpu") if module_name == "rope" else _all_residual_cases("cpu")
        caught[name] = not all(case_passes(c) for c in cases)
    return caught


# ----------------------------------------------------------------------------------------------- one Block
def block_case(dtype: torch.dtype, seed: int = 0, device: str = "cpu") -> dict:
    """One DiT Block (head_dim 128, 48 tokens, under non-reentrant checkpointing as in training), forward
    and backward with the kernels on and off. The kernel run's gate grads are compared with the torch
    run's (within `_gate_tolerance`) and then replaced by them, so every other output and grad, which
    depend on them only through the adaLN weights, must match bit for bit. Attention runs torch's math
    backend, the one whose backward is deterministic on a GPU too."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.checkpoint import checkpoint

    from library.anima import layers, model
    from library.anima.kernels import rope as rope_kernel

    cfg = model.AnimaConfig(model_channels=256, num_heads=2, mlp_hidden=512, crossattn_emb_channels=64,
                            adaln_lora_dim=32)  # fmt: skip
    torch.manual_seed(seed)
    blk = model.Block(cfg).to(device, dtype)
    rope = model.VideoRopePosition3DEmb(cfg.head_dim, 1, 8, 8, 4.0, 4.0, 1.0)(1, 6, 8, torch.device(device))
    gen = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(2, 48, 256, generator=gen), torch.randn(2, 256, generator=gen),
              torch.randn(2, 768, generator=gen) * 0.3, torch.randn(2, 5, 64, generator=gen)]  # fmt: skip
    inputs = [t.to(device, dtype) for t in inputs]
    g = torch.randn(2, 48, 256, generator=gen).to(device, dtype)
    records: dict[bool, dict[int, dict]] = {True: {}, False: {}}  # per run, per gated residual call

    def run(on: bool) -> tuple:
        calls, rope_launches = [], []

        def wrapped(x, gate, out):  # noqa: ANN001, ANN202
            # calls 3.. are the checkpoint's recompute: their tensors get no grad, so no hook fires
            i = len(calls)
            rec = records[on].setdefault(i, {"out": out.detach()})

            def on_gate(grad: torch.Tensor) -> torch.Tensor:
                rec["gate"] = grad
                return records[False][i]["gate"] if on else grad

            gate.register_hook(on_gate)
            y = layers.gated_residual(x, gate, out)
            y.register_hook(lambda grad: rec.__setitem__("grad_y", grad))
            calls.append(type(y.grad_fn).__name__)
            return y

        def counted_launch(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            rope_launches.append(1)
            return launch(*args, **kwargs)

        blk.zero_grad(set_to_none=True)
        leaves = [t.detach().requires_grad_() for t in inputs]
        launch = rope_kernel._launch
        model.gated_residual, rope_kernel._launch = wrapped, counted_launch
        try:
            with kernels(on), sdpa_kernel(SDPBackend.MATH):
                y = checkpoint(blk, *leaves, rope, use_reentrant=False)
                y.backward(g)
        finally:
            model.gated_residual, rope_kernel._launch = layers.gated_residual, launch
        grads = [t.grad for t in leaves] + [p.grad for p in blk.parameters()]
        return y, grads, calls, len(rope_launches)

    yt, grads_t, calls_t, ropes_t = run(False)
    yk, grads_k, calls_k, ropes_k = run(True)
    names = ["x", "emb", "adaln_lora", "context"] + [n for n, _ in blk.named_parameters()]
    excess, gate_bitwise, upstream_same = 0.0, 0, True
    for i in range(3):
        k, t = records[True][i], records[False][i]
        upstream_same &= same_bits(k["grad_y"], t["grad_y"]) and same_bits(k["out"], t["out"])
        p = (t["grad_y"] * t["out"]).double()
        excess = max(excess, ((k["gate"].double() - t["gate"].double()).abs()
                              / _gate_tolerance(k["gate"], t["gate"], p, dtype)).max().item())  # fmt: skip
        gate_bitwise += same_bits(k["gate"], t["gate"])
    return {"case": f"block {dtype} {device}", "forward": same_bits(yk, yt),
            "grads_differing": [n for n, a, b in zip(names, grads_k, grads_t) if not same_bits(a, b)],
            "gate_excess": excess, "gates_bitwise": gate_bitwise, "upstream_same": upstream_same,
            "kernel_fns": calls_k[:3], "torch_fns": calls_t[:3], "rope_launches": [ropes_k, ropes_t]}  # fmt: skip


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("anima_kernels_cases: run with TRITON_INTERPRET=1 (the kernels run on the CPU then)")
    torch.manual_seed(0)
    out = {"rope": _all_rope_cases("cpu"), "residual": _all_residual_cases("cpu"),
           "mutations": mutations_caught(), "block": [block_case(torch.bfloat16), block_case(torch.float16)]}  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    main()
