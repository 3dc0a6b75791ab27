"""`merged_forward` (opt-in network arg): y = x·(W + ΔW)ᵀ + b as one GEMM.

Proves: in fp64 it equals base + drop(ΔW·x) with every grad (rank dropout on), LoRA (Linear layers, its own
node with thin-product grads) included; it rebuilds ΔW even where a factored path would be chosen; it steps
aside for host-side dropout and takes an fp8 base as fp8 × scale; and it measures its effect in bf16 training, where ΔW is
rounded against W: the loss curve and the saved ΔW of a 6-step bf16 run against the same run without it
(numbers in docs/benchmarks.md).
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

import sdxl_train_network
from library.sdxl.loading import build_tiny_sdxl_models, save_sdxl_single_file
from networks import loha, lokr, lora
from networks.fp8 import apply_fp8_base
from tests.helpers.sdxl_network import build_tiny_sdxl, randomize, write_tiny_images


@pytest.fixture(scope="module")
def model():
    return build_tiny_sdxl()


@pytest.mark.parametrize("module,extra", [(loha, {}), (lokr, {}), (loha, {"use_tucker": "True"})])
def test_merged_equals_base_plus_branch_in_fp64(model, module, extra) -> None:
    m = model.clone()
    net = module.create_network(
        1.0, 4, 2, None, None, m.unet, merged_forward="True", rank_dropout="0.5", conv_dim="2", **extra
    )
    net.set_path_policy("rebuild", "eager")  # the plain side of the comparison rebuilds ΔW too
    randomize(net)
    net.to(torch.float64).train()
    net.on_step_start()
    linears = [a for a in net.unet_loras if not a.is_conv][:4]
    convs = [a for a in net.unet_loras if a.is_conv]
    convs = [a for a in convs if a.is_kxk][:2] + [a for a in convs if not a.is_kxk][:1]
    assert linears and len(convs) == 3 and all(a.merged_forward for a in linears + convs)
    for sub in linears + convs:
        base = sub.org_module.double()
        shape = (2, sub.in_dim, 6, 6) if sub.is_conv else (2, 3, sub.in_dim)
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        params = [p for p in sub.parameters() if p.requires_grad]
        merged = sub.merged_output(x)
        assert merged is not None
        plain = base(x) + sub.delta_output(x)  # the net is not applied: base(x) is the bare layer
        err, size = (merged - plain).detach().abs().max(), plain.detach().abs().max()
        assert float(err) <= 1e-12 * float(size), sub.lora_name
        assert torch.equal(sub(x), merged)  # the module forward takes the merged path
        g = torch.randn_like(plain)
        for a, b in zip(
            torch.autograd.grad(merged, [x, *params], g), torch.autograd.grad(plain, [x, *params], g)
        ):
            assert float((a - b).abs().max()) <= 1e-12 * (float(b.abs().max()) + 1e-30), sub.lora_name


@pytest.mark.parametrize("extra", [{}, {"use_scalar": "true"}])
def test_merged_lora_equals_base_plus_branch_in_fp64(model, extra) -> None:
    m = model.clone()
    net = lora.create_network(
        1.0, 4, 3, None, None, m.unet, merged_forward="True", rank_dropout="0.5", conv_dim="2", **extra
    )
    randomize(net)
    m.unet.double().requires_grad_(False)
    net.to(torch.float64).train()
    net.on_step_start()
    linears = [a for a in net.unet_loras if not a.is_conv][:5]
    conv = next(a for a in net.unet_loras if a.is_conv)
    assert conv.merged_output(torch.randn(1, conv.in_dim, 4, 4, dtype=torch.float64)) is None  # Linear only
    for sub in linears:
        base = sub.org_module
        x = torch.randn(2, 3, sub.in_dim, dtype=torch.float64, requires_grad=True)
        params = [p for p in sub.parameters() if p.requires_grad]
        merged = sub.merged_output(x)
        assert merged is not None and type(merged.grad_fn).__name__ == "MergedLoRALinearBackward"
        plain = base(x) + sub.delta_output(x)
        err, size = (merged - plain).detach().abs().max(), plain.detach().abs().max()
        assert float(err) <= 1e-12 * float(size), sub.lora_name
        g = torch.randn_like(plain)
        for a, b in zip(
            torch.autograd.grad(merged, [x, *params], g), torch.autograd.grad(plain, [x, *params], g)
        ):
            assert float((a - b).abs().max()) <= 1e-12 * (float(b.abs().max()) + 1e-30), sub.lora_name


def test_merged_lora_node_gradcheck_fp64() -> None:
    from networks.functional.fused_linear import merged_lora_linear

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64, generator=g)
    b = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    down = torch.randn(2, 6, dtype=torch.float64, generator=g, requires_grad=True)
    up = torch.randn(5, 2, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: merged_lora_linear(t[0], w, *t[1:]), (x, b, down, up))
    with pytest.raises(ValueError, match="merged_lora_linear: weight"):
        merged_lora_linear(x, w, b, down, up.t())
    with pytest.raises(ValueError, match="must be frozen"):
        merged_lora_linear(x, w.requires_grad_(), b, down, up)


def test_merged_forward_on_fp8_and_host_dropout(model) -> None:
    m = model.clone()
    net = loha.create_network(1.0, 4, 2, None, None, m.unet, merged_forward="True", module_dropout="0.5")
    randomize(net)
    sub = next(a for a in net.unet_loras if not a.is_conv)
    x = torch.randn(2, sub.in_dim)
    net.train()
    assert sub.merged_output(x) is None  # module dropout decides on the host: the plain path
    net.eval()
    net.set_path_policy("bypass", "eager")  # merged, ΔW is rebuilt even where a factored path would be chosen
    merged = sub.merged_output(x)
    assert merged is not None
    assert torch.allclose(merged, sub.org_module(x) + sub.delta_output(x), rtol=1e-5, atol=1e-6)
    for scaled in (False, True):  # an fp8 base takes part as fp8 × scale (networks/fp8.py)
        base = copy.deepcopy(sub.org_module)
        apply_fp8_base(base, scaled)
        sub._org[0], kept = base, sub.org_module
        try:
            merged = sub.merged_output(x)
            want = base(x) + sub.delta_output(x)
        finally:
            sub._org[0] = kept
        assert merged is not None and torch.allclose(merged, want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="measured on the CPU (CI), where two runs are deterministic; on a GPU, TF32 convolutions and "
    "non-deterministic kernels add run-to-run noise that AdamW amplifies",
)
@pytest.mark.parametrize("algo,net_args", [("lokr", ("factor=4",)), ("lora", ())])
def test_measured_effect_in_bf16_training(tmp_path, clip_tokenizer_dir, algo, net_args) -> None:
    """Same 6-step bf16 run with and without merged_forward; fp32 gives the same run to rounding."""
    models = build_tiny_sdxl_models(clip_tokenizer_dir, seed=0)
    save_sdxl_single_file(models, tmp_path / "tiny.safetensors")
    write_tiny_images(tmp_path / "img", 2)
    (tmp_path / "data.toml").write_text(
        f'[general]\nresolution = 64\ncaption_extension = ".txt"\n'
        f"[[datasets]]\nbatch_size = 2\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'img'}'\n"
    )

    def run(name: str, precision: str, *extra: str):
        out = tmp_path / name
        result = sdxl_train_network.main([
            "--pretrained_model_name_or_path", str(tmp_path / "tiny.safetensors"),
            "--tokenizer_cache_dir", str(clip_tokenizer_dir), "--dataset_config", str(tmp_path / "data.toml"),
            "--output_dir", str(out), "--output_name", "net", "--max_data_loader_n_workers", "0", "--seed", "1",
            "--network_module", f"networks.{algo}", "--network_dim", "4", "--max_train_steps", "6",
            "--optimizer_type", "AdamW", "--learning_rate", "3e-3", "--network_train_unet_only",
            "--cache_text_encoder_outputs", "--mixed_precision", precision, "--save_precision", "float",
            "--network_args", *net_args, *extra,
        ])  # fmt: skip
        return result.losses, load_file(str(out / "net.safetensors"))

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b.float()).norm() / b.float().norm())

    def compare(a, b) -> tuple[float, float]:
        (loss_a, sd_a), (loss_b, sd_b) = a, b
        curve = max(abs(x - y) / abs(y) for x, y in zip(loss_a, loss_b))
        factors = [k for k in sd_b if not k.endswith(".alpha") and float(sd_b[k].float().norm()) > 0]
        assert factors
        return curve, max(rel(sd_a[k], sd_b[k]) for k in factors)

    runs = {p: run(f"plain-{p}", p) for p in ("no", "bf16")}
    merged = {p: run(f"merged-{p}", p, "merged_forward=True") for p in ("no", "bf16")}
    effects = {p: compare(merged[p], runs[p]) for p in ("no", "bf16")}
    bf16_itself = compare(runs["bf16"], runs["no"])  # for scale: what bf16 mixed precision alone changes
    for name, (curve, weights) in (
        ("fp32", effects["no"]),
        ("bf16", effects["bf16"]),
        ("bf16 vs fp32", bf16_itself),
    ):
        print(
            f"{algo} merged_forward effect, {name}: loss curve max rel diff {curve:.2e}, factors max rel diff {weights:.2e}"
        )
    assert effects["no"][0] <= 1e-4 and effects["no"][1] <= 1e-3  # fp32: the same run up to rounding
    # bf16: a real effect, measured (not zero), and no larger than what bf16 itself does to this run
    assert 0 < effects["bf16"][0] <= max(2 * bf16_itself[0], 1e-3), (effects, bf16_itself)
    assert 0 < effects["bf16"][1] <= max(2 * bf16_itself[1], 0.05), (effects, bf16_itself)
