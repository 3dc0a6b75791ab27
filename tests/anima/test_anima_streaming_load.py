"""The Anima loaders read tensor by tensor (networks/tensor_stream.py): every tensor has the file's value
cast once into the asked dtype (an fp8 layer: the file's value quantized once), lands on the asked device
(the blocks kept for block swap on the CPU), and the trainer's prepared models equal, bit for bit, those of
the route used before streaming (everything in fp32 on the CPU, then quantized and cast)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from anima_train_network import build_parser
from library.anima.loading import (
    AnimaModels,
    anima_fp8_layer,
    build_tiny_anima_models,
    load_anima_dit,
    load_anima_vae,
    load_qwen3_text_encoder,
    save_anima_dit,
    save_tiny_anima_files,
    strip_dit_prefix,
    wan_to_diffusers_vae_keys,
)
from library.anima.model import Anima, tiny_anima_config
from library.anima.trainer import AnimaArchitecture
from library.training.architecture import RunContext
from library.training.steps import dtypes, make_accelerator
from networks import fp8

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tokenizers_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    models: AnimaModels = build_tiny_anima_models(tokenizers_dir, seed=0)
    files = save_tiny_anima_files(models, tmp_path_factory.mktemp("anima_stream"))
    files["dit_bf16"] = save_anima_dit(
        models.dit, files["dit"].with_name("dit_bf16.safetensors"), torch.bfloat16
    )
    return files


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype.itemsize == 1 else t  # fp8 compared bit for bit


def _assert_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].device == v.device, k
        assert torch.equal(_bits(got[k]), _bits(v)), k


def _fp8_names(dit: nn.Module) -> list[str]:
    return [n for n, m in dit.named_modules() if isinstance(m, nn.Linear) and anima_fp8_layer(n)]


@pytest.mark.parametrize("file_key", ["dit", "dit_bf16"])
@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16, torch.float16])
def test_dit_tensors_are_the_file_values_cast_once(tiny, file_key, dtype) -> None:
    raw = strip_dit_prefix(load_file(str(tiny[file_key])))
    want_dtype = dtype or next(iter(raw.values())).dtype
    dit = load_anima_dit(tiny[file_key], dtype)
    _assert_identical(dit.state_dict(), {k: v.to(want_dtype) for k, v in raw.items()})
    assert not any(p.requires_grad for p in dit.parameters()) and not dit.training


@pytest.mark.parametrize("file_key", ["dit", "dit_bf16"])
@pytest.mark.parametrize("scaled", [False, True])
def test_dit_fp8_weights_are_the_file_values_quantized_once(tiny, file_key, scaled) -> None:
    raw = strip_dit_prefix(load_file(str(tiny[file_key])))
    dit = load_anima_dit(tiny[file_key], torch.bfloat16, fp8_base=True, fp8_scaled=scaled)
    names = _fp8_names(dit)
    assert len(names) == 2 * 10 + 2 * 10 + 1  # DiT blocks, adapter blocks, adapter out_proj
    want = {k: v.to(torch.bfloat16) for k, v in raw.items()}
    for n in names:
        w8, s = fp8.quantize(raw[n + ".weight"], scaled)  # from the file's value (fp32 or bf16), one rounding
        want[n + ".weight"] = w8
        if s is not None:
            want[n + ".scale_weight"] = s
    _assert_identical(dit.state_dict(), want)
    # the route the trainer took before streaming: fp32 model quantized, the rest cast afterwards
    before = load_anima_dit(tiny[file_key], torch.float32, fp8_base=True, fp8_scaled=scaled)
    fp8.cast_keeping_fp8(before, "cpu", torch.bfloat16)
    _assert_identical(dit.state_dict(), before.state_dict())
    x, t, c = torch.randn(1, 16, 1, 8, 8), torch.tensor([0.4]), torch.randn(1, 6, 32)
    with torch.no_grad():  # the converted layers compute (the patched forward is in place)
        assert torch.equal(dit(x.bfloat16(), t, c.bfloat16()), before(x.bfloat16(), t, c.bfloat16()))


def test_offloaded_blocks_stay_on_the_cpu(tiny) -> None:
    """The meta device stands in for the GPU: everything but the last block lands there, that block on the
    CPU with the values of a plain CPU load (fp8 layers included)."""
    ref = load_anima_dit(tiny["dit"], torch.bfloat16, fp8_base=True, fp8_scaled=True).state_dict()
    dit = load_anima_dit(
        tiny["dit"], torch.bfloat16, "meta", fp8_base=True, fp8_scaled=True, offload_blocks=1
    )
    tensors = {**dit.state_dict(), **dict(dit.named_buffers())}
    on_cpu = {k for k, v in tensors.items() if v.device.type == "cpu"}
    assert on_cpu == {k for k in tensors if k.startswith("blocks.1.")} and on_cpu
    assert all(v.device.type == "meta" for k, v in tensors.items() if k not in on_cpu)
    _assert_identical({k: tensors[k] for k in on_cpu}, {k: ref[k] for k in on_cpu})
    assert dit.blocks[1].self_attn.q_proj.weight.dtype == fp8.FP8_DTYPE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_text_encoder_and_vae_are_the_file_values_cast_once(tiny, dtype) -> None:
    te_file = {
        k.removeprefix("model."): v.to(dtype) for k, v in load_file(str(tiny["text_encoder_file"])).items()
    }
    for source in (tiny["text_encoder"], tiny["text_encoder_file"]):
        _assert_identical(load_qwen3_text_encoder(source, dtype).state_dict(), te_file)
    vae_file = {k: v.to(dtype) for k, v in wan_to_diffusers_vae_keys(load_file(str(tiny["vae"]))).items()}
    vae = load_anima_vae(tiny["vae"], dtype)
    _assert_identical(vae.state_dict(), vae_file)
    _assert_identical(load_anima_vae(tiny["vae_diffusers"], dtype).state_dict(), vae_file)
    te = load_qwen3_text_encoder(tiny["text_encoder"], dtype, "meta")
    assert {t.device.type for t in [*te.parameters(), *te.buffers()]} == {"meta"}  # RoPE buffer moved too


def _trainer_models(tiny: dict[str, Path], tmp_path: Path, *flags: str) -> tuple[AnimaModels, RunContext]:
    argv = ["--pretrained_model_name_or_path", str(tiny["dit"]), "--qwen3", str(tiny["text_encoder"]),
            "--vae", str(tiny["vae"]), "--output_dir", str(tmp_path), "--network_module", "networks.lokr",
            "--mixed_precision", "bf16", "--cache_text_encoder_outputs", "--network_train_unet_only", *flags]  # fmt: skip
    args = build_parser().parse_args(argv)
    arch = AnimaArchitecture()
    arch.verify_args(args)
    ctx = RunContext(args, make_accelerator(args), dtypes(args)[0], train_text_encoder=False)
    arch.load_models(ctx)
    arch.text_cached = True
    arch.load_after_cache(ctx)
    arch.prepare_models(ctx)
    return arch.models, ctx


@pytest.mark.parametrize("flags", [(), ("--fp8_base",), ("--fp8_base", "--fp8_scaled")])
def test_trainer_models_equal_the_fp32_route(tiny, tmp_path, flags) -> None:
    models, ctx = _trainer_models(tiny, tmp_path, *flags)
    assert ctx.weight_dtype == torch.bfloat16
    to_fp8 = bool(flags)
    before = load_anima_dit(tiny["dit"], torch.float32, fp8_base=to_fp8, fp8_scaled="--fp8_scaled" in flags)
    fp8.cast_keeping_fp8(before, ctx.device, ctx.weight_dtype)
    _assert_identical(models.dit.state_dict(), before.state_dict())
    te = load_qwen3_text_encoder(tiny["text_encoder"], torch.float32).to(ctx.weight_dtype)
    _assert_identical(models.text_encoder.state_dict(), te.state_dict())
    _assert_identical(models.vae.state_dict(), load_anima_vae(tiny["vae"], torch.float32).state_dict())


_PEAK = """
import gc, json, sys
import torch
from library.anima.loading import load_anima_dit
def hwm():  # VmHWM: the peak resident set since the last reset
    line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
out = {}
for device, to_fp8 in (("meta", True), ("cpu", True), ("cpu", False)):  # the first one in a clean heap
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")  # forget the peaks so far
    base = hwm()
    dit = load_anima_dit(sys.argv[1], torch.bfloat16, device, fp8_base=to_fp8, fp8_scaled=to_fp8)
    kept = sum(t.nbytes for t in dit.state_dict().values())
    out[device + ("_fp8" if to_fp8 else "")] = {"growth": hwm() - base, "kept": kept}
    del dit
print(json.dumps(out))
"""


def test_host_memory_of_a_load_is_what_stays_on_the_host(tmp_path) -> None:
    """A 110 MB bf16 DiT: loaded onto the CPU the host holds the model once (plus the reused read and
    quantization buffers); loaded onto another device (meta stands in for the GPU) it holds only those
    buffers, never the model (Linux /proc counters). The CPU loads follow in the same process, where the
    heap may hand back memory the earlier ones freed: their bounds only get easier, and the former route
    (file mapped + converted copy) would still exceed them by the file's size."""
    cfg = tiny_anima_config()
    cfg.model_channels, cfg.num_heads, cfg.mlp_hidden, cfg.num_blocks = 768, 12, 3072, 6
    torch.manual_seed(0)
    path = save_anima_dit(Anima(cfg).to(torch.bfloat16), tmp_path / "dit.safetensors")
    size = path.stat().st_size
    largest = 768 * 3072  # elements of the largest layer: one bf16 read buffer, fp32 scratch, e4m3 result
    slack = largest * (2 + 4 + 1) + 16e6
    run = subprocess.run([sys.executable, "-c", _PEAK, str(path)], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout)
    cpu, cpu8, device8 = got["cpu"], got["cpu_fp8"], got["meta_fp8"]
    assert size > 100e6 and cpu["kept"] > 0.99 * size and cpu8["kept"] < 0.6 * size, got
    assert device8["growth"] < slack, got  # measured: 27 MB of buffers for 110 MB of weights
    assert cpu8["growth"] < cpu8["kept"] + slack and cpu["growth"] < cpu["kept"] + slack, got
