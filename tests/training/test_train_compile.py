"""--torch_compile: regional compilation of the repeated blocks in both trainers (CPU).

Proves: a compiled 3-step training run (gradient checkpointing on) gives the eager run's loss sequence
within 1e-4 relative and the same saved keys and weights; there is no graph break; blocks of one shape
share a graph (fewer graphs than blocks, i.e. no recompile per block instance); the adapters are inside
the compiled graphs (their parameters are graph inputs); bad compile flags fail with one clear error.
SDXL runs the default backend (inductor, which needs the C compiler this machine has); Anima runs
aot_eager through a recording backend so the captured graphs can be inspected.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock
from safetensors.torch import load_file
from torch._dynamo import lookup_backend, register_backend
from torch._dynamo.utils import counters

import anima_train_network
import sdxl_train_network
from library.anima.loading import build_tiny_anima_models, save_tiny_anima_files
from library.anima.trainer import AnimaArchitecture
from library.sdxl.loading import build_tiny_sdxl_models, save_sdxl_single_file
from library.training.architecture import compile_repeated_blocks
from library.training.loop import main_entry
from networks.modules.adapter import is_patched
from networks.paths import PathPolicy
from tests.helpers.sdxl_network import write_tiny_images

RECORDED: list[list[str]] = []  # graph-input names of every graph the recording backend received


@register_backend
def h11_recording_aot_eager(gm: torch.fx.GraphModule, example_inputs: list) -> object:
    RECORDED.append([n.name for n in gm.graph.nodes if n.op == "placeholder"])
    return lookup_backend("aot_eager")(gm, example_inputs)


@pytest.fixture(scope="module", autouse=True)
def _reset_dynamo():
    """Compiled graphs of this module do not leak into the next (conftest already pins one thread)."""
    yield
    torch._dynamo.reset()


pytestmark = pytest.mark.usefixtures("full_fp32")  # TF32 off (tests/training/conftest.py)


def _assert_same_run(eager, compiled, out_e: Path, out_c: Path, zero_init: str) -> None:
    assert len(eager.losses) == len(compiled.losses) == 3
    for a, b in zip(eager.losses, compiled.losses):
        assert abs(a - b) <= 1e-4 * abs(a), (eager.losses, compiled.losses)
    sd_e, sd_c = load_file(str(out_e / "net.safetensors")), load_file(str(out_c / "net.safetensors"))
    assert sd_e.keys() == sd_c.keys() and len(sd_e) > 0
    for k in sd_e:
        err = (sd_c[k].float() - sd_e[k].float()).norm()
        assert err <= 1e-4 * sd_e[k].float().norm() + 1e-7, (k, float(err))
    # the factor that starts at zero moved: the runs trained, the equality is not of two initialisations
    moved = [float(v.norm()) for k, v in sd_e.items() if k.endswith(zero_init)]
    assert moved and min(moved) > 0, zero_init


def _fresh_dynamo() -> None:
    torch._dynamo.reset()
    counters.clear()
    RECORDED.clear()


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory, clip_tokenizer_dir):
    root = tmp_path_factory.mktemp("compile_sdxl")
    models = build_tiny_sdxl_models(clip_tokenizer_dir, seed=0)
    n_blocks = sum(isinstance(m, BasicTransformerBlock) for m in models.unet.modules())
    save_sdxl_single_file(models, root / "tiny.safetensors")
    write_tiny_images(root / "img", 2)
    (root / "data.toml").write_text(
        f'[general]\nresolution = 64\ncaption_extension = ".txt"\n'
        f"[[datasets]]\nbatch_size = 2\n[[datasets.subsets]]\nimage_dir = '{root / 'img'}'\n"
    )
    return {"root": root, "tok": clip_tokenizer_dir, "n_blocks": n_blocks}


def _step_flag(extra: tuple[str, ...], default_step: bool) -> tuple[str, ...]:
    """The runs here compare eager and compiled steps: on a GPU, where the graph step is the default,
    they ask for the eager one unless the test asks for the graph (--cuda_graph) or the default."""
    return () if default_step or "--cuda_graph" in extra else ("--no_cuda_graph",)


def _sdxl_argv(s: dict, out: Path, *extra: str, default_step: bool = False) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(s["root"] / "tiny.safetensors"), "--tokenizer_cache_dir",
        str(s["tok"]), "--dataset_config", str(s["root"] / "data.toml"), "--output_dir", str(out),
        "--output_name", "net", "--max_data_loader_n_workers", "0", "--seed", "1", "--network_module",
        "networks.loha", "--network_dim", "4", "--max_train_steps", "3",
        # SGD: the update is linear in the gradient, so the saved weights compare tightly (Adam divides
        # by sqrt(v) and turns rounding noise on ~0 gradients into ±lr steps)
        "--optimizer_type", "SGDNesterov", "--optimizer_args", "momentum=0.9", "--learning_rate", "0.1",
        "--network_train_unet_only", "--cache_text_encoder_outputs", "--gradient_checkpointing", *extra,
        *_step_flag(extra, default_step),
    ]  # fmt: skip


def test_sdxl_loha_compiled_step_equals_eager(sdxl, tmp_path):
    eager = sdxl_train_network.main(_sdxl_argv(sdxl, tmp_path / "e"))
    _fresh_dynamo()
    # accelerate-style upper-case backend name, as sd-scripts users write it
    compiled = sdxl_train_network.main(
        _sdxl_argv(sdxl, tmp_path / "c", "--torch_compile", "--dynamo_backend", "INDUCTOR")
    )
    _assert_same_run(eager, compiled, tmp_path / "e", tmp_path / "c", ".hada_w2_a")
    assert not counters["graph_break"], dict(counters["graph_break"])
    graphs = counters["stats"]["unique_graphs"]
    # one graph per block shape (two resolutions here) shared by all 17 blocks, no recompile per instance
    assert sdxl["n_blocks"] == 17 and 1 <= graphs <= 2, (graphs, sdxl["n_blocks"])
    # the graph-mode cost model is chosen for the compiled run's network only
    assert eager.network.path_policy == PathPolicy("auto", "eager")
    assert compiled.network.path_policy == PathPolicy("auto", "graph")


@pytest.fixture(scope="module")
def anima(tmp_path_factory, tokenizers_dir):
    root = tmp_path_factory.mktemp("compile_anima")
    models = build_tiny_anima_models(tokenizers_dir, seed=0)
    files = save_tiny_anima_files(models, root / "models")
    write_tiny_images(root / "img", 2)
    (root / "data.toml").write_text(
        '[general]\nresolution = 64\nenable_bucket = false\ncaption_extension = ".txt"\n'
        f'[[datasets]]\nbatch_size = 2\n[[datasets.subsets]]\nimage_dir = "{root / "img"}"\n'
    )
    return {"root": root, "files": files}


def _anima_argv(s: dict, out: Path, *extra: str, default_step: bool = False) -> list[str]:
    f = s["files"]
    return [
        "--pretrained_model_name_or_path", str(f["dit"]), "--qwen3", str(f["text_encoder"]),
        "--t5_tokenizer_path", str(f["t5_tokenizer"]), "--vae", str(f["vae"]),
        "--dataset_config", str(s["root"] / "data.toml"), "--network_module", "networks.lokr",
        "--network_dim", "4", "--network_alpha", "2", "--learning_rate", "1e-2", "--optimizer_type", "AdamW",
        "--max_train_steps", "3", "--output_dir", str(out), "--output_name", "net", "--mixed_precision", "no",
        "--qwen3_max_token_length", "16", "--t5_max_token_length", "16", "--seed", "3",
        "--gradient_checkpointing", "--network_train_unet_only", "--cache_text_encoder_outputs", *extra,
        *_step_flag(extra, default_step),
    ]  # fmt: skip


def _anima_train(s: dict, out: Path, *extra: str, default_step: bool = False):
    argv = _anima_argv(s, out, *extra, default_step=default_step)
    return main_entry(AnimaArchitecture(), anima_train_network.build_parser, argv)


def test_anima_lokr_compiled_step_equals_eager_with_adapters_in_graph(anima, tmp_path):
    eager = _anima_train(anima, tmp_path / "e")
    _fresh_dynamo()
    compiled = _anima_train(
        anima, tmp_path / "c", "--torch_compile", "--dynamo_backend", "h11_recording_aot_eager"
    )
    _assert_same_run(eager, compiled, tmp_path / "e", tmp_path / "c", ".lokr_w2")
    assert not counters["graph_break"], dict(counters["graph_break"])
    # two graphs at most, whatever the depth: the first block's input needs no grad, the others' do
    assert 1 <= len(RECORDED) <= 2, len(RECORDED)
    for names in RECORDED:  # LoKr factors of the attention and MLP linears are graph inputs
        assert any("lokr_w1" in n for n in names) and any("mlp" in n and "lokr_w2" in n for n in names), names


def test_compile_flags_fail_clearly(sdxl, anima, tmp_path):
    with pytest.raises(ValueError, match="--dynamo_backend 'nope': not a torch.compile backend"):
        sdxl_train_network.main(
            _sdxl_argv(sdxl, tmp_path / "a", "--torch_compile", "--dynamo_backend", "nope")
        )
    with pytest.raises(ValueError, match="--compile_mode needs --torch_compile"):
        sdxl_train_network.main(
            _sdxl_argv(sdxl, tmp_path / "b", "--compile_mode", "max-autotune-no-cudagraphs")
        )
    with pytest.raises(ValueError, match="--compile_mode is an inductor option; --dynamo_backend eager"):
        sdxl_train_network.main(
            _sdxl_argv(
                sdxl,
                tmp_path / "d",
                "--torch_compile",
                "--dynamo_backend",
                "eager",
                "--compile_mode",
                "max-autotune",
            )
        )
    with pytest.raises(
        ValueError, match="--compile_mode reduce-overhead uses CUDA graphs, which cannot replay"
    ):
        sdxl_train_network.main(
            _sdxl_argv(
                sdxl,
                tmp_path / "e",
                "--torch_compile",
                "--compile_mode",
                "reduce-overhead",
                "--gradient_checkpointing",
            )
        )
    with pytest.raises(ValueError, match="--blocks_to_swap cannot be combined with --torch_compile"):
        _anima_train(anima, tmp_path / "c", "--torch_compile", "--blocks_to_swap", "1")
    assert not any((tmp_path / d).exists() for d in ("a", "b", "c", "d", "e"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_training_equals_eager_on_the_gpu(sdxl, anima, tmp_path, caplog):
    """Both trainers: the graph step (by default, --cuda_graph, and with --torch_compile) gives the eager
    loss curve and weights; each run logs its step mode once, and each capture its cost."""
    extra = ("--network_args", "rank_dropout=0.25")
    with caplog.at_level(logging.INFO):
        _cuda_graph_runs(sdxl, anima, tmp_path, extra)
    logs = [r.getMessage() for r in caplog.records]
    no, flag = "step mode: eager (--no_cuda_graph)", "step mode: graph (--cuda_graph)"
    default = "step mode: graph (default on CUDA; --no_cuda_graph turns it off)"
    # one line per run, in the order of _cuda_graph_runs: e, g, d, gc, then Anima's ae, ag
    assert [m for m in logs if m.startswith("step mode:")] == [no, flag, default, flag, no, flag]
    captures = [m for m in logs if m.startswith("cuda graph: captured")]
    line = (
        r"cuda graph: captured shape \(\d+(, \d+)*\) in \d+\.\d\d s, reserved [+-]\d+\.\d\d GiB "
        r"\(now \d+\.\d\d GiB\), allocated peak \d+\.\d\d GiB"
    )
    assert len(captures) >= 4 and all(re.fullmatch(line, m) for m in captures), captures  # g, d, gc, ag


def _cuda_graph_runs(sdxl: dict, anima: dict, tmp_path: Path, extra: tuple[str, ...]) -> None:
    eager = sdxl_train_network.main(_sdxl_argv(sdxl, tmp_path / "e", *extra))
    graphed = sdxl_train_network.main(_sdxl_argv(sdxl, tmp_path / "g", "--cuda_graph", *extra))
    _assert_same_run(eager, graphed, tmp_path / "e", tmp_path / "g", ".hada_w2_a")
    default = sdxl_train_network.main(_sdxl_argv(sdxl, tmp_path / "d", *extra, default_step=True))
    _assert_same_run(eager, default, tmp_path / "e", tmp_path / "d", ".hada_w2_a")
    _fresh_dynamo()
    both = sdxl_train_network.main(
        _sdxl_argv(sdxl, tmp_path / "gc", "--cuda_graph", "--torch_compile", *extra)
    )
    _assert_same_run(eager, both, tmp_path / "e", tmp_path / "gc", ".hada_w2_a")
    eager = _anima_train(anima, tmp_path / "ae")
    graphed = _anima_train(anima, tmp_path / "ag", "--cuda_graph")
    _assert_same_run(eager, graphed, tmp_path / "ae", tmp_path / "ag", ".lokr_w2")


def test_cuda_graph_flags_fail_clearly(sdxl, anima, tmp_path):
    """--cuda_graph refuses what a replayed graph cannot do, before any training, with one clear error."""
    import argparse

    from library.training.args import _verify_cuda_graph_args

    with pytest.raises(ValueError, match="--cuda_graph: --network_dropout draws a new element mask"):
        sdxl_train_network.main(_sdxl_argv(sdxl, tmp_path / "a", "--cuda_graph", "--network_dropout", "0.1"))
    with pytest.raises(ValueError, match="--cuda_graph: network neuron dropout decide on the host"):
        sdxl_train_network.main(
            _sdxl_argv(sdxl, tmp_path / "c", "--cuda_graph", "--network_args", "dropout=0.1")
        )
    if not torch.cuda.is_available():  # rank and module dropout are capturable: they get to the device check
        for name, arg in (("d", "rank_dropout=0.1"), ("b", "module_dropout=0.1")):
            with pytest.raises(ValueError, match="--cuda_graph needs a CUDA device; this run is on cpu"):
                sdxl_train_network.main(
                    _sdxl_argv(sdxl, tmp_path / name, "--cuda_graph", "--network_args", arg)
                )
    with pytest.raises(ValueError, match="--blocks_to_swap cannot be combined with --cuda_graph"):
        _anima_train(anima, tmp_path / "e", "--cuda_graph", "--blocks_to_swap", "1")
    for mode in ("reduce-overhead", "max-autotune"):
        ns = argparse.Namespace(cuda_graph=True, compile_mode=mode, deepspeed=False, network_dropout=None)
        with pytest.raises(ValueError, match=f"--compile_mode {mode} would capture its own CUDA graphs"):
            _verify_cuda_graph_args(ns)
    _verify_cuda_graph_args(  # the inductor modes without CUDA graphs are fine
        argparse.Namespace(
            cuda_graph=True, compile_mode="max-autotune-no-cudagraphs", deepspeed=False, network_dropout=None
        )
    )
    assert not any((tmp_path / d).exists() for d in ("a", "b", "c", "d", "e"))


def test_trainer_compiles_each_block_after_the_network_is_applied(sdxl, tmp_path, monkeypatch):
    """Module.compile recorded, not run: which modules, with which options, and when (adapters attached)."""
    seen = []

    def record(self, **options):
        block = isinstance(self, BasicTransformerBlock)
        seen.append(
            (type(self), options, block and is_patched(self.attn1.to_q) and is_patched(self.ff.net[2]))
        )

    monkeypatch.setattr(torch.nn.Module, "compile", record)
    sdxl_train_network.main(
        _sdxl_argv(sdxl, tmp_path / "o", "--torch_compile", "--compile_mode", "max-autotune-no-cudagraphs")
    )
    options = {"backend": "inductor", "fullgraph": False, "mode": "max-autotune-no-cudagraphs"}
    assert seen == [(BasicTransformerBlock, options, True)] * sdxl["n_blocks"]
    assert (
        torch._dynamo.config.recompile_limit >= sdxl["n_blocks"]
    )  # differing blocks never fall back to eager
    with pytest.raises(ValueError, match="no repeated blocks"):
        compile_repeated_blocks([])
    seen.clear()
    compile_repeated_blocks(
        [torch.nn.Linear(2, 2)], "aot_eager", "default"
    )  # torch's default: no mode= passed
    assert seen[0][1] == {"backend": "aot_eager", "fullgraph": False}
