"""The graph step: replay a model's forward and backward as two captured CUDA graphs.

The default step on CUDA (`library.training.step_mode` decides; `--no_cuda_graph` turns it off).

Why: an SDXL training step launches tens of thousands of small kernels (722 adapted layers, each
recomputed under gradient checkpointing) and the host, not the GPU, sets the pace. A replayed graph
launches the whole forward (or backward) at once, so the step runs at the GPU's speed.

What is captured is one call of `fn(*tensors) -> tensor` (the U-Net / DiT call) and its backward to the
trainable parameters and to the inputs that require grad. The noise, timesteps and loss stay eager,
so they draw the same random numbers and compute the same loss as the eager step.

One capture per input signature (shapes, dtypes, autocast state, the caller's `state_key`); all
captures share one memory pool, which is safe because a forward replay is always followed by its own
backward before the next forward (checked: a stale backward raises). Parameter grads go into persistent
buffers that the backward graph accumulates into in place (one layer's grad alive at a time), so
gradient accumulation works and `.grad` keeps one address (a grad already bound when the call is built,
such as the flat 8-bit optimizer's views, becomes that buffer); the optimizer's
`zero_grad(set_to_none=False)` keeps that binding, and a `None` grad is re-bound (after zeroing) before
the next backward.

The trainers capture a signature on its second call (`eager_calls=1`): its first call runs eagerly, so
the first step does not wait for a capture and a bucket shape that comes only once is never captured.
At a capture no autograd graph of an eager backward through the same parameters may still be alive (its
AccumulateGrad nodes sit on the default stream, which a capture cannot wait on); the trainers drop each
step's loss before the next step.

What a graph cannot do: read tensor values on the host, draw from generators seeded on the host, or
take a different Python branch per step. Our adapters' rank dropout and module dropout read values drawn
once per step (see `networks.modules.adapter`); neuron (element) dropout rules the graph step out.
Each capture's wall time and memory are logged and kept in `GraphedCall.capture_stats`. Under the
default step (not asked for) a failed capture turns the call eager for the rest of the run, with one
warning, rather than stopping it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass
class _Capture:
    static_inputs: list[torch.Tensor]
    static_out: torch.Tensor
    static_grad_out: torch.Tensor
    input_grads: list[torch.Tensor | None]  # grads of the inputs that require grad (None elsewhere)
    fwd: torch.cuda.CUDAGraph
    bwd: torch.cuda.CUDAGraph
    param_index: list[int]  # params that receive a grad


class GraphedCall:
    """Call `fn` through captured CUDA graphs while grad is enabled; eagerly otherwise.

    `params`: every trainable tensor `fn` may read (grads for the ones it uses are captured);
    `state_key`: Python state that changes what `fn` does (multipliers, train/eval); a new value
    captures anew. `warmup`: eager iterations before a capture (torch.compile and cuBLAS set up there).
    `fall_back`: when a capture fails (an op that cannot be captured, no memory left for the graph),
    warn once and call `fn` eagerly from then on instead of raising; for the default step, which the
    user did not ask for (an explicit `--cuda_graph` keeps the error). `eager_calls`: how many calls of a
    signature run eagerly before it is captured (the trainers use 1: the first step starts without
    waiting for a capture, and a bucket shape that comes once is never captured).
    """

    def __init__(
        self,
        fn: Callable[..., torch.Tensor],
        params: Sequence[torch.nn.Parameter],
        state_key: Callable[[], Hashable] | None = None,
        warmup: int = 2,
        fall_back: bool = False,
        eager_calls: int = 0,
    ) -> None:
        self.fn = fn
        self.fall_back = fall_back
        self.eager_calls = max(0, int(eager_calls))
        self._seen: dict[Hashable, int] = {}  # eager calls so far of each signature not yet captured
        self.failed: str | None = None  # why the capture failed, once it has (every call is eager then)
        self.params = [p for p in params if p.requires_grad]
        self.state_key = state_key
        self.warmup = max(1, int(warmup))
        self.captures: dict[Hashable, _Capture] = {}
        self.capture_stats: list[dict[str, Any]] = []  # one entry per capture (see _measured_capture)
        self._pool = None
        self._grad_bufs = [_grad_buffer(p) for p in self.params]
        self._anchor = torch.zeros(0, requires_grad=True)  # gives the autograd node an input to hang on
        self._generation = 0
        self.replays = 0

    # ------------------------------------------------------------------ public
    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or self.failed is not None:
            return self.fn(*inputs)
        self._check_inputs(inputs)
        key = self._key(inputs)
        cap = self.captures.get(key)
        if cap is None:
            seen = self._seen.get(key, 0)
            if seen < self.eager_calls:
                self._seen[key] = seen + 1
                return self.fn(*inputs)
            try:
                cap = self._measured_capture(inputs)
            except RuntimeError as err:  # torch's CUDA, capture and out-of-memory errors
                if not self.fall_back:
                    raise
                self._give_up(inputs, err)
                return self.fn(*inputs)
            self.captures[key] = cap
        self._generation += 1
        return _Replay.apply(self, cap, self._generation, self._anchor, *inputs)

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _check_inputs(inputs: Sequence[torch.Tensor]) -> None:
        for i, x in enumerate(inputs):
            if not isinstance(x, torch.Tensor) or x.device.type != "cuda":
                raise ValueError(
                    f"cuda graph: input {i} of the graphed call must be a CUDA tensor, got "
                    f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.device}"
                )

    def _give_up(self, inputs: Sequence[torch.Tensor], err: RuntimeError) -> None:
        """The default step could not capture: drop the graphs and their pool, go on eagerly, say so once.

        The persistent grad buffers stay bound as `.grad`: the eager backward accumulates into them and
        the optimizer zeroes them, as it does for the graph step."""
        first = (str(err).strip().splitlines() or [""])[0][:300]
        self.failed = f"{type(err).__name__}: {first}"
        self.captures.clear()
        self._pool = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        logger.warning(
            "cuda graph: capturing shape %s failed (%s); the run goes on with the eager step "
            "(step mode: eager). --no_cuda_graph skips the attempt; --cuda_graph makes it an error",
            tuple(inputs[0].shape), self.failed,
        )  # fmt: skip

    def _measured_capture(self, inputs: Sequence[torch.Tensor]) -> _Capture:
        """`_capture` with its cost: wall time (synchronised, warmup included) and memory, logged and kept.

        The allocated peak is the process's (`max_memory_allocated`, not reset here: other readers keep
        theirs), so it includes this capture; the pool figure counts the segments of the shared graph pool.
        """
        dev = inputs[0].device
        torch.cuda.synchronize(dev)
        reserved0, pool0 = torch.cuda.memory_reserved(dev), self._pool_bytes()
        # what is live when the capture starts, and the run's peak so far: together they say whether the
        # capture set the peak and how much of it it added on top of the live tensors
        entry, peak0 = torch.cuda.memory_allocated(dev), torch.cuda.max_memory_allocated(dev)
        start = time.perf_counter()
        cap = self._capture(inputs)
        torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - start
        reserved = torch.cuda.memory_reserved(dev)
        stats = {
            "shape": tuple(inputs[0].shape),
            "seconds": seconds,
            "reserved_delta_bytes": reserved - reserved0,
            "reserved_bytes": reserved,
            "peak_allocated_bytes": torch.cuda.max_memory_allocated(dev),
            "allocated_bytes": torch.cuda.memory_allocated(dev),
            "entry_allocated_bytes": entry,
            "peak_before_bytes": peak0,
            "pool_delta_bytes": self._pool_bytes() - pool0,
        }
        self.capture_stats.append(stats)
        logger.info(capture_log_line(stats))
        return cap

    def _pool_bytes(self) -> int:
        """Bytes of the device memory segments that belong to the captures' shared pool (0 before one)."""
        if self._pool is None:
            return 0
        pool = tuple(self._pool)
        segments = torch.cuda.memory_snapshot()
        return sum(s["total_size"] for s in segments if tuple(s.get("segment_pool_id", ())) == pool)

    def _key(self, inputs: Sequence[torch.Tensor]) -> Hashable:
        sig = tuple((tuple(x.shape), x.dtype, x.requires_grad) for x in inputs)
        dev = inputs[0].device.type
        amp = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        state = self.state_key() if self.state_key is not None else None
        return (sig, amp, state)

    def _capture(self, inputs: Sequence[torch.Tensor]) -> _Capture:
        static_inputs = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
        in_need = [i for i, x in enumerate(static_inputs) if x.requires_grad]
        amp_on, amp_dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")

        def autocast():  # the weight-cast cache must be off: cached casts would be frozen into the graph
            return torch.autocast("cuda", dtype=amp_dtype, enabled=amp_on, cache_enabled=False)

        # cuBLAS/cuDNN set-up and autotuning per shape happen in the warmup; after the first capture
        # one pass per new shape is enough
        used = self._warmup(static_inputs, autocast, self.warmup if not self.captures else 1)
        if not used and not in_need:
            raise RuntimeError("cuda graph: the graphed call has nothing that needs a gradient")
        # the warmup ran on a side stream: its cached blocks are of no use to the graphs or the eager
        # code on the main stream, so they go back to the device instead of doubling what is reserved
        torch.cuda.empty_cache()

        fwd, bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(fwd, pool=self._pool, capture_error_mode="thread_local"):
            with autocast():
                static_out = self.fn(*static_inputs)
        if self._pool is None:
            self._pool = fwd.pool()
        static_grad_out = torch.zeros_like(static_out)
        # The backward accumulates each parameter's grad straight into its persistent buffer (bound as
        # `.grad`; autograd adds in place when a grad exists), one layer's grad alive at a time, rather
        # than returning every grad at once and adding them after: that held a second copy of all grads.
        saved = [p.grad for p in self.params]
        for i in used:
            self.params[i].grad = self._grad_bufs[i]
        for x in static_inputs:
            x.grad = None
        grad_targets = [static_inputs[i] for i in in_need] + [self.params[i] for i in used]
        try:
            with torch.cuda.graph(bwd, pool=self._pool, capture_error_mode="thread_local"):
                torch.autograd.backward(static_out, static_grad_out, inputs=grad_targets)
        finally:
            for p, g in zip(self.params, saved):
                p.grad = g
        input_grads: list[torch.Tensor | None] = [None] * len(static_inputs)
        for i in in_need:  # the graph writes these inputs' grads into the tensors captured here
            input_grads[i], static_inputs[i].grad = static_inputs[i].grad, None
        return _Capture(static_inputs, static_out.detach(), static_grad_out, input_grads, fwd, bwd, used)

    def _warmup(self, static_inputs: list[torch.Tensor], autocast: Callable, passes: int) -> list[int]:
        """Eager passes on a side stream before a capture; returns the indices of params that get a grad.

        Each param's warmup grad is dropped as soon as it is accumulated, so no full set of grads is
        held, and the grads being accumulated by the training loop (bound `.grad`) are left untouched.
        """
        dev = static_inputs[0].device
        saved = [p.grad for p in self.params]
        used: set[int] = set()

        def drop(i: int) -> Callable[[torch.Tensor], None]:
            def hook(p: torch.Tensor) -> None:
                used.add(i)
                p.grad = None

            return hook

        hooks = [p.register_post_accumulate_grad_hook(drop(i)) for i, p in enumerate(self.params)]
        targets = [x for x in static_inputs if x.requires_grad] + list(self.params)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        try:
            for p in self.params:
                p.grad = None
            with torch.cuda.stream(side):
                for _ in range(passes):
                    with autocast():
                        out = self.fn(*static_inputs)
                    torch.autograd.backward(out, torch.ones_like(out), inputs=targets)
                    del out
            torch.cuda.current_stream(dev).wait_stream(side)
        finally:
            for h in hooks:
                h.remove()
            for p, g in zip(self.params, saved):
                p.grad = g
            for x in static_inputs:
                x.grad = None
        return sorted(used)

    def _bind_grads(self, used: list[int]) -> None:
        """Make `.grad` of every used param our persistent buffer (zeroed if the grad was None)."""
        to_zero: list[torch.Tensor] = []
        for i in used:
            p, buf = self.params[i], self._grad_bufs[i]
            g = p.grad
            if g is buf:
                continue
            if g is None:
                to_zero.append(buf)
            else:
                buf.copy_(g)
            p.grad = buf
        if to_zero:
            torch._foreach_zero_(to_zero)


def _grad_buffer(p: torch.nn.Parameter) -> torch.Tensor:
    """The persistent buffer `p`'s grad accumulates into: a grad already bound is kept as it is (the flat
    8-bit optimizer binds views of its one flat grad buffer and updates from there), else zeros."""
    g = p.grad
    if g is not None and g.shape == p.shape and g.dtype == p.dtype and g.device == p.device:
        return g
    return torch.zeros_like(p, memory_format=torch.preserve_format)


GIB = 1024**3


def capture_log_line(stats: dict[str, Any]) -> str:
    """The one INFO line per capture (benchmarks parse it): shape of input 0, seconds, memory in GiB."""
    return (
        f"cuda graph: captured shape {stats['shape']} in {stats['seconds']:.2f} s, "
        f"reserved {stats['reserved_delta_bytes'] / GIB:+.2f} GiB (now {stats['reserved_bytes'] / GIB:.2f} GiB), "
        f"allocated peak {stats['peak_allocated_bytes'] / GIB:.2f} GiB"
        + (
            f" (entered with {stats['entry_allocated_bytes'] / GIB:.2f} GiB allocated, "
            f"peak before {stats['peak_before_bytes'] / GIB:.2f} GiB)"
            if "entry_allocated_bytes" in stats
            else ""
        )
    )


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, runner: GraphedCall, cap: _Capture, generation: int, anchor, *inputs):  # type: ignore[override]
        for s, x in zip(cap.static_inputs, inputs):
            if s.data_ptr() != x.data_ptr():
                s.copy_(x)
        cap.fwd.replay()
        runner.replays += 1
        ctx.runner, ctx.cap, ctx.generation = runner, cap, generation
        return cap.static_out.clone()

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        runner, cap = ctx.runner, ctx.cap
        if ctx.generation != runner._generation:
            raise RuntimeError(
                "cuda graph: backward of an older forward; the graphed model was called again before "
                "this output's backward ran (one forward, then its backward, per graphed call)"
            )
        runner._bind_grads(cap.param_index)
        cap.static_grad_out.copy_(grad_out)
        cap.bwd.replay()
        in_grads = [g.clone() if g is not None else None for g in cap.input_grads]
        return (None, None, None, None, *in_grads)


def enable_checkpointing_without_rng(model: torch.nn.Module) -> None:
    """Gradient checkpointing that does not save and restore the RNG state around each block.

    Saving the CUDA RNG state reads the generator on the host, which a graph capture cannot replay.
    It is not needed here: the frozen models have no active dropout, and our adapters' dropout reads
    masks drawn once per step, so a recomputed block draws nothing.
    """
    from torch.utils.checkpoint import checkpoint

    if hasattr(model, "checkpoint_preserve_rng"):  # our Anima DiT
        model.enable_gradient_checkpointing(preserve_rng_state=False)
        return

    def checkpoint_func(module, *args, **kwargs):  # type: ignore[no-untyped-def]
        return checkpoint(module.__call__, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)

    model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_func)


def set_checkpointing_and_modes(
    denoiser: torch.nn.Module,
    text_encoders: Sequence[torch.nn.Module],
    *,
    gradient_checkpointing: bool,
    graph_step: bool,
    train_text_encoder: bool,
) -> None:
    """Turn on gradient checkpointing where asked and put the frozen models in train or eval mode.

    The denoiser (U-Net / DiT) is checkpointed without saving the RNG state for the graph step (see
    `enable_checkpointing_without_rng`); the text encoders only when they carry trained adapters. The
    models are in train mode only where checkpointing needs it: their own dropout would otherwise make
    the loss noisy.
    """
    if gradient_checkpointing:
        if graph_step:
            enable_checkpointing_without_rng(denoiser)
        else:
            denoiser.enable_gradient_checkpointing()
        if train_text_encoder:
            for te in text_encoders:  # transformers renamed the method; use whichever exists
                (getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable)()
    denoiser.train(gradient_checkpointing)
    for te in text_encoders:
        te.train(gradient_checkpointing and train_text_encoder)


class GraphedUNet:
    """A diffusers-U-Net-shaped callable (`unet(x, t, ctx, added_cond_kwargs=...).sample`) over a GraphedCall."""

    def __init__(
        self,
        unet: torch.nn.Module,
        params: Sequence[torch.nn.Parameter],
        state_key: Callable[[], Hashable],
        **options: Any,
    ) -> None:
        def call(x, t, ctx, text_embeds, time_ids):  # type: ignore[no-untyped-def]
            cond = {"text_embeds": text_embeds, "time_ids": time_ids}
            return unet(x, t, ctx, added_cond_kwargs=cond).sample

        self.graphed = GraphedCall(call, params, state_key, **options)

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor],
    ) -> SimpleNamespace:
        out = self.graphed(
            sample,
            timestep,
            encoder_hidden_states,
            added_cond_kwargs["text_embeds"],
            added_cond_kwargs["time_ids"],
        )
        return SimpleNamespace(sample=out)


def host_side_dropout(network: torch.nn.Module) -> list[str]:
    """The dropout kinds in use that decide on the host per forward: neuron (`dropout`), and module dropout
    unless the network reads it from the device (`use_device_module_dropout`).

    Rank dropout reads masks drawn once per step, so it traces and replays; these do not.
    """

    def rate(m: torch.nn.Module, attr: str) -> bool:
        r = getattr(m, attr, None)
        return isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0

    kinds = []
    if any(rate(m, "dropout") for m in network.modules()):
        kinds.append("neuron dropout")
    if any(
        rate(m, "module_dropout") and not getattr(m, "module_dropout_on_device", False)
        for m in network.modules()
    ):
        kinds.append("module dropout")
    return kinds


def graph_unsafe_dropout(network: torch.nn.Module) -> list[str]:
    """The network's dropout kinds a replayed graph cannot do, once module dropout is read from the device
    where the network can (`enable_cuda_graph_training` switches it there)."""
    kinds = host_side_dropout(network)
    if hasattr(network, "use_device_module_dropout"):
        kinds = [k for k in kinds if k != "module dropout"]
    return kinds


def training_graph_options(ctx: Any) -> dict[str, Any]:
    """How the trainers' GraphedCall behaves: each shape captured at its second step, and a failed capture
    goes on eagerly when the graph step is the default rather than asked for (`RunContext`)."""
    return {"fall_back": ctx.graph_step_falls_back, "eager_calls": 1}


def enable_cuda_graph_training(
    arch: Any, ctx: Any, network: torch.nn.Module, trainable: list[torch.nn.Parameter]
) -> None:
    """The graph step (decided by `library.training.step_mode`): graph the denoiser call."""
    if hasattr(network, "use_device_module_dropout"):
        network.use_device_module_dropout()
        network.prepare_step_masks()  # the buffer exists (at its fixed address) before the first capture
    unsafe = host_side_dropout(network)
    if unsafe:  # the step-mode decision reads graph_unsafe_dropout, which must agree
        raise RuntimeError(f"graph step chosen with network {' and '.join(unsafe)} on the host (a bug)")

    def state_key() -> tuple[bool, float]:  # what the captured forward depends on besides the inputs
        return bool(network.training), float(getattr(network, "multiplier", 1.0))

    arch.enable_cuda_graph(ctx, trainable, state_key)
