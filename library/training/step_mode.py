"""Which training step a run uses: the CUDA-graph step (`library.training.cuda_graph`) or the eager one.

The graph step removes the host's per-kernel launch cost, which sets the pace of an adapter training step.
It is the default on CUDA (`GRAPH_STEP_IS_DEFAULT`); `--cuda_graph` insists on it.
What a replayed graph cannot do rules it out: in the default mode such a run takes the eager step and
says why; with an explicit `--cuda_graph` the same conflict is an error (the user asked for the graph).
`--no_cuda_graph` always gives the eager step.

`decide_step_mode` is pure: the facts are typed values, collected by the trainer once per run.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

# On since the end-to-end run showed the graph step's loss curve equal to eager's over 56 steps on 8 bucket
# shapes at real size (docs/benchmarks.md, "End-to-end CLI benchmark", session 9).
GRAPH_STEP_IS_DEFAULT = True
GRAPH_BY_DEFAULT = "default on CUDA; --no_cuda_graph turns it off"
EAGER_BY_DEFAULT = "default; --cuda_graph replays the step as CUDA graphs"
GRAPH_BY_FLAG = "--cuda_graph"
GRAPH_CAPTURING_COMPILE_MODES = ("reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class StepMode:
    """The decided step: `mode` and the reason the run logs (`step mode: <mode> (<reason>)`)."""

    mode: Literal["graph", "eager"]
    reason: str
    warnings: tuple[str, ...] = ()  # conflicts an explicit --cuda_graph overrides (the run warns once each)

    @property
    def graph(self) -> bool:
        return self.mode == "graph"

    @property
    def graph_by_default(self) -> bool:
        """The graph step was not asked for: if a capture fails, the run may go on with the eager step."""
        return self.graph and self.reason == GRAPH_BY_DEFAULT

    def log_line(self) -> str:
        return f"step mode: {self.mode} ({self.reason})"


@dataclass(frozen=True)
class StepFacts:
    """Everything the decision reads. `None` means not known yet: the rule that needs it is not applied
    (the arguments are checked before the device and the network exist, and again once they do)."""

    cuda_graph: bool = False  # --cuda_graph given
    no_cuda_graph: bool = False  # --no_cuda_graph given
    device_type: str | None = None  # "cuda", "cpu", "mps", ...
    num_processes: int = 1
    network_dropout: float | None = None  # --network_dropout
    blocks_to_swap: int | None = None
    deepspeed: bool = False
    compile_mode: str | None = None
    cpu_offload_checkpointing: bool = False
    host_dropout: tuple[str, ...] = ()  # dropout kinds of the network that decide on the host per forward
    network_module: str = ""
    network_draws_per_step: bool | None = None  # the network draws its dropout once per step (ours do)
    trainer_without_graph: str | None = None  # name of a trainer (architecture) that has no graph step

    @classmethod
    def from_args(cls, args: argparse.Namespace, **known: object) -> StepFacts:
        """The facts the command line gives; `known` adds what the run found out (device, network)."""
        return cls(
            cuda_graph=bool(getattr(args, "cuda_graph", False)),
            no_cuda_graph=bool(getattr(args, "no_cuda_graph", False)),
            network_dropout=getattr(args, "network_dropout", None),
            blocks_to_swap=getattr(args, "blocks_to_swap", None),
            deepspeed=bool(getattr(args, "deepspeed", False)),
            compile_mode=getattr(args, "compile_mode", None),
            cpu_offload_checkpointing=bool(getattr(args, "cpu_offload_checkpointing", False)),
            network_module=str(getattr(args, "network_module", "") or ""),
            **known,  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class _Rule:
    """One thing that rules the graph step out. `refusal`: the error under --cuda_graph; None: an
    explicit --cuda_graph goes ahead anyway (with a warning), since nothing is known to break."""

    applies: Callable[[StepFacts], bool]
    reason: Callable[[StepFacts], str]
    refusal: Callable[[StepFacts], str] | None


_NO_FLAG = _Rule(
    lambda f: f.no_cuda_graph,
    lambda f: "--no_cuda_graph",
    lambda f: "--cuda_graph and --no_cuda_graph contradict each other; pass one of them",
)
_NOT_CUDA = _Rule(
    lambda f: f.device_type is not None and f.device_type != "cuda",
    lambda f: f"not a CUDA device: {f.device_type}",
    lambda f: f"--cuda_graph needs a CUDA device; this run is on {f.device_type}",
)
_CONFLICTS = (
    _Rule(
        lambda f: f.trainer_without_graph is not None,
        lambda f: f"the {f.trainer_without_graph} trainer has no graph step",
        lambda f: f"--cuda_graph is not supported by the {f.trainer_without_graph} trainer",
    ),
    _Rule(
        lambda f: f.compile_mode in GRAPH_CAPTURING_COMPILE_MODES,
        lambda f: f"--compile_mode {f.compile_mode} captures its own CUDA graphs",
        lambda f: (
            f"--cuda_graph captures the whole model; --compile_mode {f.compile_mode} would capture its "
            "own CUDA graphs inside it: use --compile_mode default or max-autotune-no-cudagraphs"
        ),
    ),
    _Rule(
        lambda f: f.deepspeed,
        lambda f: "--deepspeed runs the backward in its own engine",
        lambda f: "--cuda_graph cannot be combined with --deepspeed",
    ),
    _Rule(
        lambda f: f.cpu_offload_checkpointing,
        lambda f: "--cpu_offload_checkpointing moves activations to the CPU in every step",
        lambda f: "--cuda_graph cannot be combined with --cpu_offload_checkpointing; remove one of them",
    ),
    _Rule(
        lambda f: bool(f.network_dropout),
        lambda f: "--network_dropout draws a new element mask in every forward",
        lambda f: (
            "--cuda_graph: --network_dropout draws a new element mask in every forward, which a replayed "
            "graph cannot do; use rank_dropout in --network_args, or drop --cuda_graph"
        ),
    ),
    _Rule(
        lambda f: bool(f.blocks_to_swap),
        lambda f: "--blocks_to_swap moves blocks between devices in every step",
        lambda f: "--blocks_to_swap cannot be combined with --cuda_graph; remove one of them",
    ),
    _Rule(
        lambda f: bool(f.host_dropout),
        lambda f: f"network {' and '.join(f.host_dropout)} decide on the host in every forward",
        lambda f: (
            f"--cuda_graph: network {' and '.join(f.host_dropout)} decide on the host in every forward, "
            "which a replayed graph cannot do; use rank_dropout, or drop --cuda_graph"
        ),
    ),
)
_UNPROVEN = (
    _Rule(
        lambda f: f.num_processes > 1,
        lambda f: f"{f.num_processes} processes: the graph step is not proven under multi-GPU DDP",
        None,
    ),
    _Rule(
        lambda f: f.network_draws_per_step is False,
        lambda f: (
            f"--network_module {f.network_module} is not one of this project's networks: its dropout "
            "may draw in every forward, which a replayed graph cannot do"
        ),
        None,
    ),
)


def decide_step_mode(facts: StepFacts, graph_by_default: bool = GRAPH_STEP_IS_DEFAULT) -> StepMode:
    """Graph or eager, and why; raises ValueError (one line) for a conflict with an explicit --cuda_graph.

    The order of the rules is the order of the reasons: with --cuda_graph the argument conflicts come
    before the device (as they are found before any model loads); without it, a device that is not
    CUDA is the reason that matters most.
    """
    if facts.cuda_graph:
        overridden = []
        for rule in (_NO_FLAG, *_CONFLICTS, _NOT_CUDA, *_UNPROVEN):
            if not rule.applies(facts):
                continue
            if rule.refusal is not None:
                raise ValueError(rule.refusal(facts))
            overridden.append(f"--cuda_graph: {rule.reason(facts)}; running the graph step as asked")
        return StepMode("graph", GRAPH_BY_FLAG, tuple(overridden))
    for rule in (_NO_FLAG, _NOT_CUDA, *_CONFLICTS, *_UNPROVEN):
        if rule.applies(facts):
            return StepMode("eager", rule.reason(facts))
    if facts.device_type is None:
        raise RuntimeError("decide_step_mode: the default mode needs the device type (a bug in the caller)")
    return StepMode("graph", GRAPH_BY_DEFAULT) if graph_by_default else StepMode("eager", EAGER_BY_DEFAULT)
