"""fp8 base (networks/fp8.py) on a tiny Anima: the fp8 Linear node, released and fp8 checkpoint layouts,
LoRA/LoHa/LoKr training on an fp8 base (base untouched, files laid out as in bf16 runs), block swap,
merging into fp8 weights, and fp8 inference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import anima_minimal_inference as inf
import anima_train_network as trainer
from library.anima import trainer as at
from library.anima.loading import anima_fp8_layer, load_anima_dit, strip_dit_prefix
from library.anima.model import Anima, tiny_anima_config
from library.inference.lora_merge import merge_into_modules
from networks import fp8, lokr
from tests.anima.test_anima_inference import make_lora_sd
from tests.anima.test_anima_train import _argv
from tests.anima.test_anima_train import setup as setup  # noqa: F401  (module fixture: tiny model files + dataset)


def _fp8_linears(dit: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in dit.named_modules() if isinstance(m, nn.Linear) and anima_fp8_layer(n)}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)  # fp8 compared bit for bit (NaN-safe, -0 distinct)


# ------------------------------------------------------------------------------------------- the maths
def _output_errors(w: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
    """Relative output error against the bf16 weight (products exact in fp32) of plain fp8, one scale per
    tensor and one per output channel (what --fp8_scaled stores)."""
    ref = F.linear(x, w.bfloat16().float())
    s = w.abs().amax() / fp8.FP8_MAX
    weights = {
        "plain": fp8.dequantize(*fp8.quantize(w, False), torch.float32),
        "per_tensor": (w / s).to(fp8.FP8_DTYPE).float() * s,
        "per_channel": fp8.dequantize(*fp8.quantize(w, True), torch.float32),
    }
    return {k: float((F.linear(x, v) - ref).norm() / ref.norm()) for k, v in weights.items()}


def test_quantize_bounds_and_scaled_error_is_smaller() -> None:
    g = torch.Generator().manual_seed(0)
    # Anima's mlp.layer2 width at nn.Linear's init: U(±1/√8192) = U(±0.011) lies below e4m3's smallest normal
    # number 2^-6 ≈ 0.0156, where plain fp8 keeps 1-2 significant bits
    w = (torch.rand(256, 8192, generator=g) * 2 - 1) / 8192**0.5
    x = torch.randn(64, 8192, generator=g)
    w8, s = fp8.quantize(w, scaled=True)
    assert w8.dtype == fp8.FP8_DTYPE and s.shape == (256, 1) and s.dtype == torch.float32
    assert torch.equal(w8.float().abs().amax(dim=1), torch.full((256,), 448.0))  # each row's max onto 448
    # round-to-nearest with 3 mantissa bits: at most 2^-4 relative where the scaled value is a normal number
    q = w.double() / s.double()
    normal = q.abs() >= 2.0**-6
    rel = ((w8.double() - q).abs() / q.abs())[normal]
    assert normal.float().mean() > 0.9 and rel.max() <= 2.0**-4 + 1e-6
    e = _output_errors(w, x)
    # measured: plain 8.8 %, per tensor 2.53 %, per channel 2.53 % (e4m3 rounding alone)
    assert e["per_channel"] < 0.027 and e["plain"] > 3 * e["per_channel"], e
    # rows of uneven norm (log-normal, σ = 1, as trained weights have): one scale per row fits each row
    w = (torch.rand(256, 2048, generator=g) * 2 - 1) / 2048**0.5 * torch.exp(torch.randn(256, 1, generator=g))
    e = _output_errors(w, torch.randn(64, 2048, generator=g))
    # measured: plain 2.88 %, per tensor 2.74 %, per channel 2.67 %
    assert e["per_channel"] < e["per_tensor"] < e["plain"], e


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_quantize_in_place_equals_the_plain_formula(dtype) -> None:
    """The in-place maths (optionally in a caller's scratch and result buffers) gives the bits of the formula:
    |w| max per row, w / scale, clamp to ±448, cast; zero rows, -0, saturating and tiny values included."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(24, 40, generator=g) * torch.logspace(-6, 3, 24)[:, None]).to(dtype)
    w[3] = 0.0
    w[4, :5] = -0.0
    w[5, 7] = 1e5 if dtype != torch.bfloat16 else 1e4
    w32 = w.float()
    amax = w32.abs().reshape(24, -1).amax(dim=1)
    scale = torch.where(amax > 0, amax / fp8.FP8_MAX, torch.ones_like(amax)).reshape(-1, 1)
    want = {False: (w32.clamp(-448, 448).to(fp8.FP8_DTYPE), None),
            True: ((w32 / scale).clamp(-448, 448).to(fp8.FP8_DTYPE), scale)}  # fmt: skip
    scratch, out = torch.full((2000,), float("nan")), torch.full((2000,), 7.0).to(fp8.FP8_DTYPE)
    for scaled in (False, True):
        for got in (
            fp8.quantize(w, scaled),
            fp8.quantize(w, scaled, scratch),
            fp8.quantize(w, scaled, None, out),
        ):
            assert torch.equal(_bits(got[0]), _bits(want[scaled][0]))
            assert (got[1] is None) == (want[scaled][1] is None)
            assert got[1] is None or torch.equal(got[1], want[scaled][1])
    assert torch.equal(w32, w.float())  # the input is left as it was
    assert out.data_ptr() == fp8.quantize(w, True, scratch, out)[0].data_ptr()  # written in place


def test_fp8_linear_node_is_exact_and_keeps_fp8_for_backward() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(24, 16).double()
    ref = nn.Linear(24, 16).double()
    fp8.apply_fp8_base(lin, scaled=True)
    with torch.no_grad():
        ref.weight.copy_(fp8.dequantized_weight(lin, torch.float64))
        ref.bias.copy_(lin.bias)
    lin.bias.requires_grad_(True)
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lin(x)
    assert torch.equal(y, ref(x))  # fp8 × scale is exact in fp64, the same products follow
    gx, gb = torch.autograd.grad(y.square().sum(), (x, lin.bias))
    rx, rb = torch.autograd.grad(ref(x).square().sum(), (x, ref.bias))
    assert torch.equal(gx, rx) and torch.equal(gb, rb)
    weights = [t for t in saved if t.shape == lin.weight.shape]
    assert weights and all(t.dtype == fp8.FP8_DTYPE for t in weights)  # no upcast copy kept
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(x.float()).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------- files
def _layout(dit: Anima, kind: str) -> dict[str, torch.Tensor]:
    """The tiny DiT's state dict as an fp8 checkpoint in one of the layouts found in the wild."""
    sd = dit.state_dict()
    if kind in ("plain", "per_channel"):  # our writer: `.scale_weight` of shape (out, 1), as sd-scripts
        return {
            "net." + k: v for k, v in fp8.pack_fp8_state_dict(sd, kind != "plain", anima_fp8_layer).items()
        }
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        layer = k[: -len(".weight")]
        if not (k.endswith(".weight") and v.dim() == 2 and anima_fp8_layer(layer)):
            out["model.diffusion_model." + k] = v
            continue
        if kind == "blockwise":  # (out, blocks, 1) over the input dimension
            s = v.reshape(v.shape[0], 2, -1).abs().amax(-1, keepdim=True) / 448
            out["model.diffusion_model." + k] = (
                (v.reshape(v.shape[0], 2, -1) / s).reshape(v.shape).to(fp8.FP8_DTYPE)
            )
            out[f"model.diffusion_model.{layer}.scale_weight"] = s
            continue
        s = v.abs().amax() / 448
        out["model.diffusion_model." + k] = (v / s).to(fp8.FP8_DTYPE)
        if kind == "comfy_marker":  # one scale per tensor, a marker key and input scales
            out[f"model.diffusion_model.{layer}.scale_weight"] = s.reshape(())
            out[f"model.diffusion_model.{layer}.scale_input"] = torch.ones(())
        else:  # per-layer quantization config
            out[f"model.diffusion_model.{layer}.weight_scale"] = s.reshape(())
            out[f"model.diffusion_model.{layer}.input_scale"] = torch.ones(())
            conf = json.dumps({"format": "float8_e4m3fn"}).encode()
            out[f"model.diffusion_model.{layer}.comfy_quant"] = torch.tensor(list(conf), dtype=torch.uint8)
    if kind == "comfy_marker":
        out["model.diffusion_model.scaled_fp8"] = torch.empty(0, dtype=fp8.FP8_DTYPE)
    return out


@pytest.mark.parametrize("kind", ["plain", "per_channel", "comfy_marker", "comfy_quant", "blockwise"])
def test_fp8_checkpoints_load(setup, tmp_path, kind) -> None:  # noqa: F811
    base = load_anima_dit(setup["files"]["dit"], torch.float32)
    raw = _layout(base, kind)
    path = tmp_path / "dit_fp8.safetensors"
    save_file(raw, str(path))
    sd = strip_dit_prefix(raw)
    # dequantized into the asked dtype: every tensor is fp8 × its scale exactly
    dit = load_anima_dit(path, torch.float32)
    for name, mod in _fp8_linears(dit).items():
        w8 = sd[name + ".weight"]
        s = sd.get(name + ".scale_weight", sd.get(name + ".weight_scale"))
        if kind == "blockwise":
            want = (w8.float().reshape(w8.shape[0], 2, -1) * s).reshape(w8.shape)
        else:
            want = w8.float() if s is None else w8.float() * (s if s.dim() else s.reshape(1, 1))
        assert mod.weight.dtype == torch.float32 and torch.equal(mod.weight, want), name
    assert torch.equal(dit.final_layer.linear.weight, base.final_layer.linear.weight)
    # kept as stored under fp8 (block-wise scales are not a per-channel layout: quantized again)
    dit8 = load_anima_dit(path, torch.float32, fp8_base=True)
    assert dit8.dtype == torch.float32  # the embedders keep the weight dtype
    for name, mod in _fp8_linears(dit8).items():
        assert mod.weight.dtype == fp8.FP8_DTYPE, name
        if kind != "blockwise":
            assert torch.equal(_bits(mod.weight), _bits(sd[name + ".weight"])), name
    x, t, c = torch.randn(1, 16, 1, 8, 8), torch.tensor([0.4]), torch.randn(1, 6, 32)
    with torch.no_grad():
        got, want = dit8(x, t, c), dit(x, t, c)
    if kind == "blockwise":  # quantized again from the dequantized weights: e4m3 rounding once more
        assert 0 < (got - want).norm() / want.norm() < 0.1
    else:  # the stored values computed with: equal up to kernel order (see test_anima_model_loading)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_released_bf16_file_quantizes_per_layer_rule(setup) -> None:  # noqa: F811
    dit = load_anima_dit(setup["files"]["dit"], torch.float32, fp8_base=True, fp8_scaled=True)
    names = {
        n for n, m in dit.named_modules() if isinstance(m, nn.Linear) and m.weight.dtype == fp8.FP8_DTYPE
    }
    assert names == set(_fp8_linears(dit))
    # all DiT block and adapter projections; embedders, AdaLN modulation and the final layer stay float
    assert "blocks.0.mlp.layer1" in names and "llm_adapter.blocks.1.mlp.2" in names
    assert "llm_adapter.out_proj" in names and "blocks.0.adaln_modulation_mlp.1" not in names
    assert "x_embedder.proj.1" not in names and "final_layer.linear" not in names
    assert all(
        dit.get_submodule(n).scale_weight.shape == (dit.get_submodule(n).out_features, 1) for n in names
    )


# ------------------------------------------------------------------------------------------- training
def _capture(monkeypatch) -> dict:
    """Record the prepared DiT's fp8 tensors and every step's loss of the next trainer run."""
    seen: dict = {"losses": []}
    prepare, loss = at.AnimaArchitecture.prepare_models, at.AnimaArchitecture.per_sample_loss

    def prepare_models(self, ctx):
        prepare(self, ctx)
        seen["dit"] = self.models.dit
        seen["before"] = {k: v.clone() for k, v in self.models.dit.state_dict().items()}

    def per_sample_loss(self, ctx, batch):
        out = loss(self, ctx, batch)
        seen["losses"].append(float(out.detach().mean()))
        return out

    monkeypatch.setattr(at.AnimaArchitecture, "prepare_models", prepare_models)
    monkeypatch.setattr(at.AnimaArchitecture, "per_sample_loss", per_sample_loss)
    return seen


def _layout_of(path: Path) -> dict[str, tuple]:
    with safe_open(str(path), "pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


@pytest.mark.parametrize(
    "module,flags",
    [("networks.lora", ("--fp8_base",)), ("networks.loha", ("--fp8_base", "--fp8_scaled")),
     ("networks.lokr", ("--fp8_scaled",))],
)  # fmt: skip
def test_adapters_train_on_fp8_base(setup, tmp_path, monkeypatch, module, flags) -> None:  # noqa: F811
    common = ("--mixed_precision", "bf16", "--max_train_steps", "3", "--cache_latents",
              "--cache_text_encoder_outputs", "--network_train_unet_only", "--gradient_checkpointing")  # fmt: skip
    ref = trainer.main(_argv(setup, tmp_path / "bf16", module, *common))
    seen = _capture(monkeypatch)
    out = trainer.main(_argv(setup, tmp_path / "fp8", module, *common, *flags))
    assert len(seen["losses"]) == 3 and all(torch.isfinite(torch.tensor(seen["losses"])))
    dit, before = seen["dit"], seen["before"]
    fp8_layers = _fp8_linears(dit)
    assert len(fp8_layers) == 2 * 10 + 2 * 10 + 1  # DiT blocks, adapter blocks, adapter out_proj
    scaled = "--fp8_scaled" in flags
    for name, mod in fp8_layers.items():  # stored in fp8 and untouched by training
        assert mod.weight.dtype == fp8.FP8_DTYPE and not mod.weight.requires_grad, name
        assert torch.equal(_bits(mod.weight.detach()), _bits(before[name + ".weight"])), name
        assert (fp8.layer_scale(mod) is not None) == scaled, name
        if scaled:
            assert torch.equal(mod.scale_weight, before[name + ".scale_weight"]), name
    assert dit.x_embedder.proj[1].weight.dtype == torch.bfloat16  # the rest in the mixed-precision dtype
    # the saved network: the same keys, shapes and dtypes as the bf16 run's
    assert _layout_of(out) == _layout_of(ref)
    # ΔW starts at zero for all three algorithms: a change of the merged weights shows the adapters trained
    base = load_anima_dit(setup["files"]["dit"], torch.float32)
    merged = load_anima_dit(setup["files"]["dit"], torch.float32)
    rep = merge_into_modules([("lora_unet", merged)], load_file(str(out)), 1.0)
    assert rep.matched == 20 and not rep.unused
    delta = max(
        (merged.get_submodule(n).weight - base.get_submodule(n).weight).abs().max() for n in fp8_layers
    )
    assert 0 < delta < 1


def test_block_swap_on_fp8_keeps_outputs_and_grads() -> None:
    cfg = tiny_anima_config()
    cfg.num_blocks = 4
    torch.manual_seed(0)
    dit = Anima(cfg).requires_grad_(False)
    fp8.apply_fp8_base(dit, True, anima_fp8_layer)
    net = lokr.create_network(1.0, 4, 2.0, None, None, dit)
    net.apply_to(None, dit, apply_text_encoder=False, apply_unet=True)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    dit.enable_gradient_checkpointing()
    dit.train()
    x, t, c = torch.randn(1, 16, 1, 8, 8), torch.tensor([0.5]), torch.randn(1, 8, 32)

    def run():
        out = dit(x, t, c)
        return out, torch.autograd.grad(out.square().sum(), list(net.parameters()))

    want, want_g = run()
    at.enable_block_swap(dit, 2, "cpu")
    got, got_g = run()
    assert torch.equal(got, want) and all(torch.equal(a, b) for a, b in zip(got_g, want_g, strict=True))
    assert dit.blocks[3].self_attn.q_proj.weight.dtype == fp8.FP8_DTYPE


# ------------------------------------------------------------------------------------------- merging, inference
def test_merge_into_scaled_fp8_layer(setup) -> None:  # noqa: F811
    dit = load_anima_dit(setup["files"]["dit"], torch.float32)
    sd = make_lora_sd(dit, None, "lokr", seed=3)
    want = load_anima_dit(setup["files"]["dit"], torch.float32)
    dit8 = load_anima_dit(setup["files"]["dit"], torch.float32, fp8_base=True, fp8_scaled=True)
    # the reference: merged in fp32 into fp8 × scale, then quantized once with fresh scales
    for name, mod in want.named_modules():
        if isinstance(mod, nn.Linear) and anima_fp8_layer(name):
            with torch.no_grad():
                mod.weight.copy_(fp8.dequantized_weight(dit8.get_submodule(name), torch.float32))
    merge_into_modules([("lora_unet", want)], dict(sd), 1.0)
    rep = merge_into_modules([("lora_unet", dit8)], dict(sd), 1.0)
    assert rep.matched > 0 and not rep.unused
    for name, mod in _fp8_linears(dit8).items():
        w8, s = fp8.quantize(want.get_submodule(name).weight, scaled=True)
        assert torch.equal(_bits(mod.weight), _bits(w8)) and torch.equal(mod.scale_weight, s), name


def test_inference_with_fp8_flags_and_fp8_file(setup, tmp_path) -> None:  # noqa: F811
    from tests.anima.test_anima_inference import _argv as inf_argv
    from tests.anima.test_anima_inference import _latent

    files = dict(setup["files"])
    ref = _latent(inf.main(inf_argv(files, tmp_path / "ref")))
    base = load_anima_dit(files["dit"], torch.float32)
    fp8_file = tmp_path / "dit_fp8.safetensors"
    save_file(_layout(base, "comfy_marker"), str(fp8_file))
    errors = {}
    for label, dit, flags in (("fp8", files["dit"], ["--fp8"]), ("fp8_scaled", files["dit"], ["--fp8_scaled"]),
                              ("fp8_file", fp8_file, ["--fp8"]), ("fp8_file_dequantized", fp8_file, [])):  # fmt: skip
        lat = _latent(inf.main(inf_argv({**files, "dit": dit}, tmp_path / label, *flags)))
        errors[label] = float((lat - ref).norm() / ref.norm())
    assert all(0 < e < 0.2 for e in errors.values()), errors
    # an fp8 file under --fp8 computes with the stored values: the same image as dequantizing it
    assert errors["fp8_file"] == pytest.approx(errors["fp8_file_dequantized"], rel=1e-3, abs=1e-5), errors
