"""The step-mode decision (library/training/step_mode.py): the graph step by default on CUDA, eager with a
reason where something rules the graph out, the old errors with an explicit --cuda_graph; the one log line
per run; --no_cuda_graph in both trainers' parsers; the capture log line's format (CPU)."""

from __future__ import annotations

import argparse
import logging

import pytest
import torch
from diffusers import UNet2DConditionModel

import anima_train_network
import sdxl_train_network
from library.anima.trainer import AnimaArchitecture
from library.sdxl.config import tiny_sdxl_configs
from library.sdxl.trainer import SdxlArchitecture
from library.training.architecture import TrainingArchitecture
from library.training.args import parse_args
from library.training.cuda_graph import capture_log_line, graph_unsafe_dropout
from library.training.step_mode import (
    EAGER_BY_DEFAULT,
    GRAPH_BY_DEFAULT,
    GRAPH_STEP_IS_DEFAULT,
    StepFacts,
    StepMode,
    decide_step_mode,
)
from networks import lora
from tests.helpers.train_sdxl import _argv

CUDA = {"device_type": "cuda"}

# (facts besides the device, the reason in the default mode, the error with --cuda_graph or None: goes ahead)
RULED_OUT = [
    ({"no_cuda_graph": True}, "--no_cuda_graph",
     "--cuda_graph and --no_cuda_graph contradict each other; pass one of them"),
    ({"trainer_without_graph": "FooArchitecture"}, "the FooArchitecture trainer has no graph step",
     "--cuda_graph is not supported by the FooArchitecture trainer"),
    ({"compile_mode": "reduce-overhead"}, "--compile_mode reduce-overhead captures its own CUDA graphs",
     "--cuda_graph captures the whole model; --compile_mode reduce-overhead would capture its own CUDA graphs "
     "inside it: use --compile_mode default or max-autotune-no-cudagraphs"),
    ({"compile_mode": "max-autotune"}, "--compile_mode max-autotune captures its own CUDA graphs",
     "--cuda_graph captures the whole model; --compile_mode max-autotune would capture its own CUDA graphs "
     "inside it: use --compile_mode default or max-autotune-no-cudagraphs"),
    ({"deepspeed": True}, "--deepspeed runs the backward in its own engine",
     "--cuda_graph cannot be combined with --deepspeed"),
    ({"cpu_offload_checkpointing": True}, "--cpu_offload_checkpointing moves activations to the CPU in every step",
     "--cuda_graph cannot be combined with --cpu_offload_checkpointing; remove one of them"),
    ({"network_dropout": 0.1}, "--network_dropout draws a new element mask in every forward",
     "--cuda_graph: --network_dropout draws a new element mask in every forward, which a replayed graph "
     "cannot do; use rank_dropout in --network_args, or drop --cuda_graph"),
    ({"blocks_to_swap": 2}, "--blocks_to_swap moves blocks between devices in every step",
     "--blocks_to_swap cannot be combined with --cuda_graph; remove one of them"),
    ({"host_dropout": ("neuron dropout", "module dropout")},
     "network neuron dropout and module dropout decide on the host in every forward",
     "--cuda_graph: network neuron dropout and module dropout decide on the host in every forward, which a "
     "replayed graph cannot do; use rank_dropout, or drop --cuda_graph"),
    ({"num_processes": 2}, "2 processes: the graph step is not proven under multi-GPU DDP", None),
    ({"network_module": "lycoris.kohya", "network_draws_per_step": False},
     "--network_module lycoris.kohya is not one of this project's networks: its dropout may draw in every "
     "forward, which a replayed graph cannot do", None),
]  # fmt: skip


def test_default_on_cuda_without_conflict() -> None:
    facts = StepFacts(device_type="cuda", network_draws_per_step=True, num_processes=1)
    # the default: the graph step
    assert GRAPH_STEP_IS_DEFAULT
    mode = decide_step_mode(facts)
    assert mode == StepMode("graph", GRAPH_BY_DEFAULT)
    assert (
        mode.graph and mode.log_line() == "step mode: graph (default on CUDA; --no_cuda_graph turns it off)"
    )
    # with the switch off, the same facts give the eager step and say how to ask for the graph
    off = decide_step_mode(facts, graph_by_default=False)
    assert off == StepMode("eager", EAGER_BY_DEFAULT) and not off.graph
    assert off.log_line() == "step mode: eager (default; --cuda_graph replays the step as CUDA graphs)"
    explicit = decide_step_mode(StepFacts(cuda_graph=True, device_type="cuda", network_draws_per_step=True))
    assert (
        explicit == StepMode("graph", "--cuda_graph")
        and explicit.log_line() == "step mode: graph (--cuda_graph)"
    )
    # only the default graph step may turn eager when a capture fails; an asked-for one keeps the error
    assert mode.graph_by_default and not explicit.graph_by_default and not off.graph_by_default
    # what is not a conflict: the inductor modes without CUDA graphs, zero dropout, no swap, one process
    quiet = StepFacts(
        device_type="cuda", compile_mode="max-autotune-no-cudagraphs", network_dropout=0.0, blocks_to_swap=0
    )
    assert decide_step_mode(quiet, graph_by_default=True).graph
    assert decide_step_mode(
        StepFacts(device_type="cuda", compile_mode="default"), graph_by_default=True
    ).graph


@pytest.mark.parametrize("facts,reason,error", RULED_OUT, ids=[r[1][:40] for r in RULED_OUT])
def test_each_conflict_gives_eager_by_default_and_the_old_error_with_cuda_graph(facts, reason, error) -> None:
    mode = decide_step_mode(StepFacts(**CUDA, **facts))
    assert mode == StepMode("eager", reason)
    assert mode.log_line() == f"step mode: eager ({reason})"
    explicit = StepFacts(cuda_graph=True, **CUDA, **facts)
    if error is None:  # not known to break: an explicit --cuda_graph runs the graph step and warns
        mode = decide_step_mode(explicit)
        assert mode.graph and mode.warnings == (f"--cuda_graph: {reason}; running the graph step as asked",)
    else:
        with pytest.raises(ValueError) as info:
            decide_step_mode(explicit)
        assert str(info.value) == error


def test_device_and_order_of_reasons() -> None:
    cpu = decide_step_mode(StepFacts(device_type="cpu", network_dropout=0.1))
    assert (
        cpu.log_line() == "step mode: eager (not a CUDA device: cpu)"
    )  # the device is the reason that matters
    assert decide_step_mode(StepFacts(device_type="mps")).reason == "not a CUDA device: mps"
    off = decide_step_mode(StepFacts(device_type="cpu", no_cuda_graph=True))
    assert off.log_line() == "step mode: eager (--no_cuda_graph)"
    with pytest.raises(ValueError, match=r"^--cuda_graph needs a CUDA device; this run is on cpu$"):
        decide_step_mode(StepFacts(cuda_graph=True, device_type="cpu"))
    # explicit: the argument conflicts come first (they are found before any model loads), then the device
    with pytest.raises(ValueError, match="--network_dropout draws"):
        decide_step_mode(StepFacts(cuda_graph=True, device_type="cpu", network_dropout=0.1))
    with pytest.raises(ValueError, match="network neuron dropout decide on the host"):
        decide_step_mode(StepFacts(cuda_graph=True, device_type="cpu", host_dropout=("neuron dropout",)))
    # facts not known yet are not applied (the argument check runs before device and network exist)
    assert decide_step_mode(StepFacts(cuda_graph=True)).graph
    with pytest.raises(RuntimeError, match="needs the device type"):
        decide_step_mode(StepFacts())


def test_facts_from_args() -> None:
    args = argparse.Namespace(cuda_graph=False, no_cuda_graph=True, network_dropout=0.2, deepspeed=False,
                              compile_mode=None, cpu_offload_checkpointing=False, network_module="networks.lora")  # fmt: skip
    facts = StepFacts.from_args(args, device_type="cuda", num_processes=4)
    assert facts == StepFacts(no_cuda_graph=True, network_dropout=0.2, network_module="networks.lora",
                              device_type="cuda", num_processes=4)  # fmt: skip
    assert StepFacts.from_args(argparse.Namespace(blocks_to_swap=3)).blocks_to_swap == 3  # Anima's flag


def test_which_trainers_have_a_graph_step() -> None:
    class Bare(TrainingArchitecture):  # a trainer that does not implement enable_cuda_graph
        pass

    Bare.__abstractmethods__ = frozenset()
    assert SdxlArchitecture().has_graph_step() and AnimaArchitecture().has_graph_step()
    assert not Bare().has_graph_step()
    with pytest.raises(NotImplementedError, match="the Bare trainer has no graph step"):
        Bare().enable_cuda_graph(None, [], None)


def _tiny_unet_network(**net_args: str):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**tiny_sdxl_configs()["unet"])
    net = lora.create_network(1.0, 4, 2, None, [], unet, **net_args)
    net.apply_to([], unet, apply_text_encoder=False, apply_unet=True)
    return net


def test_graph_unsafe_dropout_of_our_network_and_of_a_foreign_one() -> None:
    assert graph_unsafe_dropout(_tiny_unet_network(rank_dropout="0.3")) == []  # drawn once per step
    # our module dropout is read from the device under the graph step: only neuron dropout is unsafe
    net = _tiny_unet_network(dropout="0.1", module_dropout="0.5")
    assert graph_unsafe_dropout(net) == ["neuron dropout"]
    assert not any(
        getattr(m, "module_dropout_on_device", False) for m in net.modules()
    )  # nothing switched yet

    class Foreign(torch.nn.Module):  # a network without the device path decides module dropout on the host
        def __init__(self) -> None:
            super().__init__()
            self.mod = torch.nn.Linear(2, 2)
            self.mod.module_dropout = 0.2

    assert graph_unsafe_dropout(Foreign()) == ["module dropout"]


def test_no_cuda_graph_flag_in_both_trainers(tmp_path) -> None:
    for parser in (sdxl_train_network.setup_parser(), anima_train_network.build_parser()):
        assert parser.parse_args(["--no_cuda_graph"]).no_cuda_graph is True
        assert parser.parse_args([]).no_cuda_graph is False and parser.parse_args([]).cuda_graph is False
        assert parser.parse_args(["--cuda_graph"]).cuda_graph is True
    base = ["--pretrained_model_name_or_path", "m.safetensors", "--network_module", "networks.lora",
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    assert parse_args(sdxl_train_network.setup_parser(), base + ["--no_cuda_graph"]).no_cuda_graph
    with pytest.raises(ValueError, match="--cuda_graph and --no_cuda_graph contradict each other"):
        parse_args(sdxl_train_network.setup_parser(), base + ["--cuda_graph", "--no_cuda_graph"])


def test_capture_log_line_format() -> None:
    gib = 1024**3
    stats = {"shape": (2, 4, 128, 96), "seconds": 3.456, "reserved_delta_bytes": int(1.5 * gib),
             "reserved_bytes": int(20.25 * gib), "peak_allocated_bytes": int(18.4 * gib)}  # fmt: skip
    assert capture_log_line(stats) == (
        "cuda graph: captured shape (2, 4, 128, 96) in 3.46 s, reserved +1.50 GiB (now 20.25 GiB), "
        "allocated peak 18.40 GiB"
    )
    stats.update(entry_allocated_bytes=int(6.5 * gib), peak_before_bytes=int(7.25 * gib))
    assert capture_log_line(stats).endswith(
        "allocated peak 18.40 GiB (entered with 6.50 GiB allocated, peak before 7.25 GiB)"
    )


def test_one_step_mode_line_in_a_tiny_run(tiny, tmp_path, caplog) -> None:
    """On the CPU (CI) the eager step with its reason; on a GPU the default graph step and its one capture
    (the first step of a shape runs eagerly, the second captures it)."""
    argv = _argv(tiny, tmp_path / "out", "--network_module", "networks.lora", "--network_dim", "2",
                 "--max_train_steps", "2", "--network_train_unet_only", "--cache_text_encoder_outputs")  # fmt: skip
    with caplog.at_level(logging.INFO):
        result = sdxl_train_network.main(argv)
    assert result.global_step == 2
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step mode:")]
    captures = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cuda graph: captured")]
    if torch.cuda.is_available():
        assert lines == ["step mode: graph (default on CUDA; --no_cuda_graph turns it off)"]
        assert len(captures) == 1
    else:
        assert lines == ["step mode: eager (not a CUDA device: cpu)"] and not captures
