"""Per-layer path choice (networks.paths, the cost model of networks.functional.dispatch) and fast path == plain path through the module wrappers.

The cost-model checks use crossovers measured on the H100: by bench/bench_layers.py (functions, older runs)
and by bench/bench_paths.py (the modules as the network runs them, run 22; raw rows in bench/results).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from networks import paths
from networks.functional import factorization, lokr_bypass_linear
from networks.functional.dispatch import (
    choose_loha_path,
    choose_lokr_path,
    lokr_linear_costs,
)
from networks.loha import LoHaModule
from networks.lokr import LoKrModule, plan_lokr
from networks.paths import PathPolicy


def _lokr_choice(o: int, i: int, n: int, f: int, mode: str) -> str:
    a, b = factorization(o, f)
    c, d = factorization(i, f)
    return choose_lokr_path(n, a, b, c, d, mode=mode)


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_lokr_choice_matches_measured_crossovers(mode):
    # H100 layer bench: bypass 3.29 vs rebuild 4.52 ms (8192×2048), 3.26 vs 4.90 (2048×8192); rebuild
    # wins at SDXL's 640² / 1280² (0.23 vs 0.40 ms, 0.20 vs 0.24 ms in graph mode)
    assert _lokr_choice(8192, 2048, 16384, -1, mode) == "bypass"
    assert _lokr_choice(2048, 8192, 16384, -1, mode) == "bypass"
    assert _lokr_choice(640, 640, 16384, -1, mode) == "rebuild"
    assert _lokr_choice(1280, 1280, 4096, 8, mode) == "rebuild"


def test_loha_choice_matches_measured_crossovers():
    # H100 layer bench run 4 (final KhatriRaoLinear), layer incl. base: Khatri–Rao wins on big layers in
    # both modes (8192×2048 r8 graph 2.43 vs 4.48 ms, r32 eager 3.91 vs 4.85); it loses at SDXL sizes in
    # eager (1280² r32 1.66 vs 1.35 ms; 10240×1280 r8 3.17 vs 1.69) and at r32 in graph (0.33 vs 0.23)
    assert choose_loha_path(16384, 8192, 2048, 8, "graph") == "khatri_rao"
    assert choose_loha_path(16384, 8192, 2048, 32, "eager") == "khatri_rao"
    assert choose_loha_path(4096, 1280, 1280, 32, "eager") == "rebuild"
    assert choose_loha_path(4096, 10240, 1280, 8, "eager") == "rebuild"
    assert choose_loha_path(4096, 1280, 1280, 32, "graph") == "rebuild"
    assert choose_loha_path(4096, 1280, 1280, 8, "graph") == "khatri_rao"


RUN22 = [
    json.loads(line)
    for name in ("h100_run22_paths_sdxl.jsonl", "h100_run22_paths_anima.jsonl")
    for line in (Path(__file__).resolve().parents[2] / "bench" / "results" / name).read_text().splitlines()
]


def _measured_winners(algo: str, mode: str, margin: float = 0.05) -> list[tuple[tuple[int, int, int], str]]:
    """(O, I, N) → the path measured faster per training step in run 22, where the two differ by > margin."""
    out = []
    for shape in sorted({(r["O"], r["I"], r["N"]) for r in RUN22 if "variant" in r}):
        t = {
            r["variant"].split("_", 1)[1]: r[f"{mode}_extra_us"]
            for r in RUN22
            if (r.get("O"), r.get("I"), r.get("N")) == shape and r.get("variant", "").startswith(algo + "_")
        }
        (fast, t_fast), (_, t_slow) = sorted(t.items(), key=lambda kv: kv[1])
        if t_slow > (1 + margin) * t_fast:
            out.append((shape, fast))
    return out


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_model_picks_the_path_measured_faster_at_real_sdxl_and_anima_shapes(mode):
    # run 22: every LoKr (factor -1) / LoHa (r32) layer shape of SDXL (batch 4) and Anima (batch 2) at 1024²,
    # forward + recompute + backward through the modules; near-ties (≤ 5 %) are left out
    lokr, loha = _measured_winners("lokr", mode), _measured_winners("loha", mode)
    assert len(lokr) >= 10 and len(loha) >= 10
    for (o, i, n), fast in lokr:
        assert _lokr_choice(o, i, n, -1, mode) == fast, (o, i, n)
    for (o, i, n), fast in loha:
        assert choose_loha_path(n, o, i, 32, mode) == fast, (o, i, n)
    # both answers occur: the model is not a constant
    assert {f for _, f in lokr} == {"rebuild", "bypass"}
    assert {f for _, f in loha} == {"rebuild", "khatri_rao"}


def test_costs_grow_with_tokens_and_bad_input():
    small = lokr_linear_costs(1024, 32, 40, 32, 40, mode="graph")
    big = lokr_linear_costs(65536, 32, 40, 32, 40, mode="graph")
    assert big["rebuild"] > small["rebuild"] and big["bypass"] > 4 * small["bypass"]
    with pytest.raises(ValueError, match="tokens"):
        choose_lokr_path(0, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="mode"):
        choose_loha_path(8, 4, 4, 2, mode="fast")
    with pytest.raises(ValueError, match="path"):
        PathPolicy("sometimes")


def _randomize(module: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _fwd_bwd(module, x, gy):
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(gy)
    grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads


def _assert_same(fast, plain, tol=1e-5):
    for a, b in zip([fast[0], fast[1], *fast[2]], [plain[0], plain[1], *plain[2]]):
        assert a.shape == b.shape
        assert b.abs().max() > 1e-4  # the check must be able to fail
        assert (a - b).abs().max() <= tol * max(1.0, b.abs().max().item())


LINEAR = nn.Linear(12, 20, bias=True)
CONV3 = nn.Conv2d(6, 8, 3, padding=1, padding_mode="reflect")
CONV1 = nn.Conv2d(6, 8, 1)


@pytest.mark.parametrize("org", [LINEAR, CONV3, CONV1], ids=["linear", "conv3x3", "conv1x1"])
@pytest.mark.parametrize("use_scalar", [False, True])
def test_loha_khatri_rao_module_equals_rebuild(org, use_scalar):
    gen = torch.Generator().manual_seed(1)
    m = LoHaModule("lora_unet_x", org, multiplier=0.7, rank=3, alpha=2.0, use_scalar=use_scalar)
    _randomize(m, gen)
    shape = (2, 5, 12) if isinstance(org, nn.Linear) else (2, 6, 5, 4)
    x = torch.randn(shape, generator=gen)
    gy = torch.randn(org(x).shape, generator=gen)
    m.use_factored = True
    fast = _fwd_bwd(m, x, gy)
    m.use_factored = False
    plain = _fwd_bwd(m, x, gy)
    _assert_same(fast, plain)


@pytest.mark.parametrize(
    "kw",
    [dict(rank=8), dict(rank=1, factor=2), dict(rank=1, factor=2, decompose_both=True)],
    ids=["full", "lowrank_w2", "lowrank_both"],
)
@pytest.mark.parametrize("use_scalar", [False, True])
def test_lokr_bypass_module_equals_rebuild(kw, use_scalar):
    gen = torch.Generator().manual_seed(2)
    org = nn.Linear(12, 20)
    layout = plan_lokr(20, 12, (1, 1), **kw)
    m = LoKrModule("lora_unet_y", org, 0.7, layout, alpha=0.5, use_scalar=use_scalar)
    _randomize(m, gen)
    x = torch.randn(3, 4, 12, generator=gen)
    gy = torch.randn(3, 4, 20, generator=gen)
    m.use_factored = True
    fast = _fwd_bwd(m, x, gy)
    m.use_factored = False
    plain = _fwd_bwd(m, x, gy)
    _assert_same(fast, plain)


def test_auto_choice_is_cached_per_input_size_and_follows_policy(monkeypatch):
    calls = []

    def spy(policy, tokens, a, b, c, d):
        calls.append(tokens)
        return "bypass" if tokens > 10 else "rebuild"

    monkeypatch.setattr(paths, "select_lokr_path", spy)
    m = LoKrModule("lora_unet_z", nn.Linear(12, 20), 1.0, plan_lokr(20, 12, (1, 1), 8), alpha=None)
    small, big = torch.randn(2, 3, 12), torch.randn(4, 5, 12)
    assert not paths.factored(m, small) and paths.factored(m, big)
    assert not paths.factored(m, small) and paths.factored(m, big)
    assert calls == [6, 20]  # one decision per token count, then cached
    monkeypatch.undo()
    policy = PathPolicy("bypass", mode="graph")
    assert (policy.path, policy.mode) == ("bypass", "graph")
    h = LoHaModule("lora_unet_w", nn.Linear(12, 20), 1.0, rank=2, alpha=1.0)
    h.set_path_policy(policy)
    assert paths.factored(h, small)
    t = LoHaModule("lora_unet_t", CONV3, 1.0, rank=2, alpha=1.0, use_tucker=True)
    t.set_path_policy(policy)
    assert not paths.factored(t, torch.randn(1, 6, 4, 4))  # Tucker has no Khatri–Rao form


def test_adapter_paths_compile_fullgraph_and_match_eager():
    """Capturable: no graph break, .item() or host sync in the fast paths (aot_eager traces fwd+bwd)."""
    gen = torch.Generator().manual_seed(3)
    org = nn.Linear(12, 20)
    lokr = LoKrModule("lora_unet_c", org, 0.5, plan_lokr(20, 12, (1, 1), 8), alpha=None)
    loha = LoHaModule("lora_unet_d", nn.Linear(12, 20), 0.5, rank=2, alpha=1.0)
    for m in (lokr, loha):
        _randomize(m, gen)
    lokr.use_factored = True
    loha.use_factored = True
    x = torch.randn(2, 3, 12, generator=gen)
    gy = torch.randn(2, 3, 20, generator=gen)
    for m in (lokr, loha):
        torch._dynamo.reset()
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        got = _fwd_bwd(compiled, x, gy)
        want = _fwd_bwd(m, x, gy)
        _assert_same(got, want)
    w1, w2 = lokr.w1().detach(), lokr.w2().detach()
    fn = torch.compile(lambda t: lokr_bypass_linear(t, w1, w2, 0.25), fullgraph=True, backend="aot_eager")
    assert torch.allclose(fn(x), lokr_bypass_linear(x, w1, w2, 0.25), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_khatri_rao_linear_function_equals_rebuild(dtype):
    """KhatriRaoLinear (rebuilds everything in backward) == x·ΔWᵀ with ΔW from the LoHa rebuild:
    output and the grads of x, all four factors and a trainable scale (use_scalar σ)."""
    from networks.functional import loha_delta_weight, loha_khatri_rao_linear

    gen = torch.Generator().manual_seed(4)
    shapes = [(7, 3), (3, 5), (7, 2), (2, 5)]
    w = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True) for s in shapes]
    x = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
    gy = torch.randn(2, 4, 7, generator=gen, dtype=torch.float64).to(dtype)
    sigma = torch.tensor(0.3, dtype=dtype, requires_grad=True)
    fast = loha_khatri_rao_linear(x, *w, sigma)
    g_fast = torch.autograd.grad(fast, [x, *w, sigma], gy)
    slow = torch.nn.functional.linear(x, loha_delta_weight(*w, sigma))
    g_slow = torch.autograd.grad(slow, [x, *w, sigma], gy)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert (fast - slow).abs().max() <= tol * slow.abs().max()
    for a, b in zip(g_fast, g_slow):
        assert b.abs().max() > 1e-3 and (a - b).abs().max() <= tol * b.abs().max()


def test_khatri_rao_linear_keeps_no_middle_for_backward():
    """Only x and the thin factors are saved: no N×r² middle and no (O, r²) / (r², I) Khatri–Rao factor."""
    from networks.functional import loha_khatri_rao_linear

    n, i, o, r = 512, 24, 16, 4
    w = [torch.randn(s).requires_grad_(True) for s in [(o, r), (r, i), (o, r), (r, i)]]
    x = torch.randn(n, i, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loha_khatri_rao_linear(x, *w, 1.0)
    assert max(saved) == n * i  # x itself; the middle would be n·r² = 8192 values
    assert n * r * r not in saved and o * r * r not in saved and r * r * i not in saved
    assert sorted(saved) == sorted([n * i, o * r, r * i, o * r, r * i])
