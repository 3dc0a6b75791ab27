"""The Anima half of the network trainer (sd-scripts' anima_train_network.py) on the shared loop.

Rectified flow: x_s = (1-s)*x0 + s*n, the DiT predicts v = n - x0. Timesteps come from
`--timestep_sampling`, the loss is weighted by `--weighting_scheme`. Latents and Qwen3 outputs can be
cached; the LLM adapter is part of the DiT and always runs (it may carry LoRA modules).
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch import nn

from library.anima.loss import FlowLossConfig, flow_matching_loss
from library.training.architecture import DatasetInfo, RunContext, SampleRequest, TrainingArchitecture
from library.training.cuda_graph import GraphedCall, set_checkpointing_and_modes, training_graph_options
from networks.fp8 import cast_keeping_fp8

if TYPE_CHECKING:
    from library.anima.model import Anima

logger = logging.getLogger(__name__)

LATENT_CACHE_SUFFIX = "_anima"
TE_CACHE_SUFFIX = "_anima_te"
TIMESTEP_SAMPLING = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")
WEIGHTING_SCHEMES = ("none", "uniform", "logit_normal", "mode", "sigma_sqrt", "cosmap")
# flags that belong to epsilon/v-prediction training and mean nothing for flow matching
_NOT_FOR_FLOW = ("v_parameterization", "min_snr_gamma", "debiased_estimation_loss", "zero_terminal_snr",
                 "scale_v_pred_loss_like_noise_pred", "v_pred_like_loss", "noise_offset",
                 "multires_noise_iterations", "adaptive_noise_scale")  # fmt: skip


def add_anima_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--qwen3", type=str, default=None, help="Qwen3-0.6B text encoder: folder or single safetensors file")
    a(
        "--t5_tokenizer_path",
        type=str,
        default=None,
        help="T5 tokenizer folder (default: the bundled T5 tokenizer)",
    )
    a(
        "--qwen3_tokenizer_path",
        type=str,
        default=None,
        help="Qwen3 tokenizer folder (default: the --qwen3 folder if it has one, else the bundled one)",
    )
    a("--qwen3_max_token_length", type=int, default=512)
    a("--t5_max_token_length", type=int, default=512)
    a("--timestep_sampling", choices=TIMESTEP_SAMPLING, default="sigmoid")
    a("--sigmoid_scale", type=float, default=1.0)
    a("--discrete_flow_shift", type=float, default=1.0)
    a("--weighting_scheme", choices=WEIGHTING_SCHEMES, default="uniform")
    a("--logit_mean", type=float, default=0.0)
    a("--logit_std", type=float, default=1.0)
    a("--mode_scale", type=float, default=1.29)
    a("--blocks_to_swap", type=int, default=None, help="keep the last N DiT blocks on the CPU, streamed in")
    a("--unsloth_offload_checkpointing", action="store_true", help="not implemented: refused")
    a("--attn_mode", choices=["torch", "sdpa"], default=None, help="attention kernel (PyTorch SDPA)")
    a("--split_attn", action="store_true", help="accepted; attention is never split here")
    a("--vae_chunk_size", type=int, default=None, help="not implemented: refused")
    a("--vae_disable_cache", action="store_true", help="not implemented: refused")
    a("--text_encoder_batch_size", type=int, default=None, help="batch size when caching Qwen3 outputs")


def apply_cached_caption_dropout(
    rates: list[float],
    states: torch.Tensor,
    qmask: torch.Tensor,
    t5_ids: torch.Tensor,
    t5_mask: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop captions of cached samples with their subset's rate: the result equals encoding "".

    Dropped rows get zero Qwen3 states and mask, and T5 ids/mask [1, 0, ...] (just `</s>`).
    """
    if not rates or not any(rates):
        return states, qmask, t5_ids, t5_mask
    drop = torch.rand(len(rates), generator=generator) < torch.tensor(rates)
    if not drop.any():
        return states, qmask, t5_ids, t5_mask
    d = drop.to(states.device)
    states = torch.where(d[:, None, None], torch.zeros_like(states), states)
    qmask = torch.where(d[:, None], torch.zeros_like(qmask), qmask)
    empty = torch.zeros_like(t5_ids[0])
    empty[0] = 1
    t5_ids = torch.where(d[:, None], empty.expand_as(t5_ids), t5_ids)
    t5_mask = torch.where(d[:, None], empty.expand_as(t5_mask), t5_mask)
    return states, qmask, t5_ids, t5_mask


# ------------------------------------------------------------------------------------------- block swap
def _move_params(mod: nn.Module, device: torch.device | str) -> None:
    """Re-home every parameter/buffer as a NEW tensor object on `device`.

    Unlike `Module.to` (which swaps `.data` in place), the old objects stay valid for autograd, so a
    backward pass still finds the device copies it saved; they are freed once nothing needs them.
    """
    for sub in mod.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.device != torch.device(device):
                sub._parameters[name] = nn.Parameter(p.detach().to(device), requires_grad=p.requires_grad)
        for name, b in list(sub._buffers.items()):
            if b is not None and b.device != torch.device(device):
                sub._buffers[name] = b.to(device)


def swapped_blocks(dit: nn.Module, n: int | None) -> list[nn.Module]:
    """The blocks `--blocks_to_swap n` keeps off the device: the last `n` (the loader keeps the same on the CPU)."""
    blocks = list(dit.blocks)
    return blocks[len(blocks) - n :] if n else []


def enable_block_swap(
    dit: nn.Module, n: int, device: torch.device | str, offload_device: torch.device | str = "cpu"
) -> list[Any]:
    """Keep the last `n` blocks' weights on `offload_device`; each is brought in just before its forward.

    Outputs and gradients equal the un-swapped model's. Peak memory drops most together with
    --gradient_checkpointing (then the device copies of a swapped block die right after its forward).
    Returns the hook handles.
    """
    blocks = dit.blocks
    max_swap = len(blocks) - 2  # the first two blocks always stay on the device (as in sd-scripts)
    if max_swap < 1:
        raise ValueError(
            f"--blocks_to_swap {n}: this DiT has only {len(blocks)} blocks and block swap needs at least 3 "
            "(2 always stay on the device); remove --blocks_to_swap"
        )
    if not 0 < n <= max_swap:
        raise ValueError(
            f"--blocks_to_swap {n}: must be between 1 and {max_swap} for a DiT with {len(blocks)} blocks"
        )
    handles = []
    for blk in swapped_blocks(dit, n):
        _move_params(blk, offload_device)
        handles.append(blk.register_forward_pre_hook(lambda mod, _a: _move_params(mod, device)))
        handles.append(blk.register_forward_hook(lambda mod, _a, _o: _move_params(mod, offload_device)))
    logger.info("--blocks_to_swap: %d of %d blocks live on %s", n, len(blocks), offload_device)
    return handles


# ------------------------------------------------------------------------------------------ architecture
class AnimaArchitecture(TrainingArchitecture):
    base_model_version = "anima"
    script = "anima_train_network.py"
    modelspec_architecture = "anima-preview"
    modelspec_implementation = "https://github.com/circlestone-labs/Anima"
    bucket_step_multiple = 16
    sample_size_multiple = 16
    sample_min_size = 64

    def __init__(self) -> None:
        super().__init__()
        self.text_cached = False
        self.graphed_dit: GraphedCall | None = None
        self.loss_config: FlowLossConfig | None = None  # built from the parsed flags at the first step
        self.dropout_rates: dict[str, float] = {}  # image key -> caption_dropout_rate of its subset
        self.caption_rates: dict[str, float] = {}  # cached caption -> rate (written into the npz)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_anima_arguments(parser)

    def verify_args(self, args: argparse.Namespace) -> None:
        if not args.qwen3:
            raise ValueError("--qwen3 is required: the Qwen3-0.6B text encoder (folder or .safetensors file)")
        if not args.vae:
            raise ValueError("--vae is required: the Qwen-Image VAE (qwen_image_vae.safetensors)")
        from networks.tensor_files import check_tensor_file, check_weight_folder

        qwen3 = Path(args.qwen3)
        if qwen3.is_file():  # a cut or pickled file is named before any model loads
            check_tensor_file(qwen3, "--qwen3", expected="a Qwen3 .safetensors file or folder")
        elif qwen3.is_dir():
            check_weight_folder(qwen3, "--qwen3")
        for name in _NOT_FOR_FLOW:
            if getattr(args, name, None):
                raise ValueError(f"--{name} does not apply to Anima's flow-matching objective; remove it")
        for name in ("unsloth_offload_checkpointing", "vae_chunk_size", "vae_disable_cache"):
            if getattr(args, name, None):
                raise ValueError(f"--{name} is not implemented for Anima")
        if args.blocks_to_swap and getattr(args, "torch_compile", False):
            # the swap hooks replace parameters inside the block call that --torch_compile compiles
            raise ValueError("--blocks_to_swap cannot be combined with --torch_compile; remove one of them")
        if args.blocks_to_swap and getattr(args, "cpu_offload_checkpointing", False):
            raise ValueError("--blocks_to_swap cannot be combined with --cpu_offload_checkpointing")
        te_cache = args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk
        if te_cache and not args.network_train_unet_only:
            raise ValueError(
                "--cache_text_encoder_outputs needs --network_train_unet_only (Qwen3 LoRA needs the live TE)"
            )
        if args.cache_text_encoder_outputs_to_disk:
            args.cache_text_encoder_outputs = True
        if args.cache_latents_to_disk:
            args.cache_latents = True

    def extra_metadata(self, args: argparse.Namespace) -> dict[str, str]:
        keys = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "timestep_sampling",
                "sigmoid_scale", "discrete_flow_shift")  # fmt: skip
        return {f"ss_{k}": str(getattr(args, k)) for k in keys}

    # ------------------------------------------------------------------ models
    def load_models(self, ctx: RunContext) -> None:
        from library.anima.loading import (
            AnimaModels,
            load_anima_tokenizers,
            load_anima_vae,
            load_qwen3_text_encoder,
            read_anima_dit_config,
        )

        args = ctx.args
        te_path = Path(args.qwen3)
        # --base_weights merges in fp32 on the CPU first (prepare_models then casts once)
        dtype = torch.float32 if args.base_weights else ctx.weight_dtype
        # Qwen3 and the VAE stay on the CPU between caching and sampling: loaded there in their final dtypes
        te = load_qwen3_text_encoder(args.qwen3, dtype)
        vae = load_anima_vae(args.vae, torch.float32)
        qwen_tok, t5_tok = load_anima_tokenizers(args.qwen3_tokenizer_path, args.t5_tokenizer_path, te_path)
        self.models = AnimaModels(
            dit=None, text_encoder=te, vae=vae, qwen_tokenizer=qwen_tok, t5_tokenizer=t5_tok
        )
        if args.base_weights:  # the networks are merged into it before caching: it has to exist now
            self.models.dit = self._load_dit(ctx, torch.float32, torch.device("cpu"))
        else:  # a file that is no Anima DiT is named now, not after the caching
            read_anima_dit_config(args.pretrained_model_name_or_path)

    def load_after_cache(self, ctx: RunContext) -> None:
        """The DiT streams onto the device only now, so that the VAE and Qwen3 caching never shares the
        device with its weights (2.2 GiB under --fp8_base, 3.9 GiB in bf16); no copy of it on the host."""
        if self.models.dit is None:
            self.models.dit = self._load_dit(ctx, ctx.weight_dtype, ctx.device)

    @staticmethod
    def _load_dit(ctx: RunContext, dtype: torch.dtype, device: torch.device) -> Anima:
        from library.anima.loading import load_anima_dit

        args = ctx.args
        # fp8 weights are quantized from the file's values (one rounding); the blocks that --blocks_to_swap
        # keeps on the CPU are loaded there
        return load_anima_dit(
            args.pretrained_model_name_or_path, dtype, device, fp8_base=bool(getattr(args, "fp8_base", False)),
            fp8_scaled=bool(getattr(args, "fp8_scaled", False)), offload_blocks=args.blocks_to_swap or 0,
        )  # fmt: skip

    def network_targets(self) -> tuple[Any, Any, Any]:
        m = self.models
        return m.vae, [m.text_encoder], m.dit

    # ------------------------------------------------------------------ text
    def _tokens(self, args: argparse.Namespace, captions: list[str]):
        from library.anima.text import tokenize_anima_captions

        m = self.models
        return tokenize_anima_captions(
            m.qwen_tokenizer, m.t5_tokenizer, captions, args.qwen3_max_token_length, args.t5_max_token_length
        )

    def _qwen3_states(self, ids: torch.Tensor, mask: torch.Tensor, grad: bool) -> torch.Tensor:
        te = self.models.text_encoder
        dev = next(te.parameters()).device
        with torch.set_grad_enabled(grad):
            out = te(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).last_hidden_state
            return out * mask.to(dev)[..., None].to(out.dtype)  # padded rows are zero, as in the reference

    def encode_text_for_cache(self, args: argparse.Namespace, captions: list[str]) -> dict[str, torch.Tensor]:
        toks = self._tokens(args, captions)
        states = self._qwen3_states(toks.qwen_ids, toks.qwen_mask, grad=False)
        return {
            "prompt_embeds": states.float(),
            "attn_mask": toks.qwen_mask.to(torch.int32),
            "t5_input_ids": toks.t5_ids.to(torch.int32),
            "t5_attn_mask": toks.t5_mask.to(torch.int32),
            # stored for sd-scripts compatibility of the npz; the trainer reads the live subset rate
            "caption_dropout_rate": torch.tensor([self.caption_rates.get(c, 0.0) for c in captions]),
        }

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        from library.anima.loading import anima_encode_latents

        vae = self.models.vae
        with torch.no_grad():
            return anima_encode_latents(vae, images.to(vae.device, vae.dtype)).float()

    def cache(self, ctx: RunContext, data: DatasetInfo) -> None:
        from library.data import cache as dcache
        from library.data.captions import caption_options, deterministic_caption

        m, args, accelerator = self.models, ctx.args, ctx.accelerator
        common = self.cache_kwargs(ctx)
        if args.cache_latents:
            m.vae.to(accelerator.device)
            dcache.cache_latents(
                self.dataset, self.encode_latents, to_disk=bool(args.cache_latents_to_disk),
                vae_batch_size=args.vae_batch_size or 1, suffix=LATENT_CACHE_SUFFIX, settings="anima-vae", **common,
            )  # fmt: skip
            m.vae.to(self._after_cache_device(args))
        if args.cache_text_encoder_outputs:
            m.text_encoder.to(accelerator.device, ctx.weight_dtype)
            settings = f"anima-qwen3:{args.qwen3_max_token_length}:{args.t5_max_token_length}"
            # caption dropout survives caching: the cached outputs of a dropped caption are replaced per
            # sample by those of the empty caption (apply_cached_caption_dropout), so the rate still applies
            for info in self.dataset.image_infos():
                if info.subset.caption_dropout_every_n_epochs:
                    raise ValueError(
                        "caption_dropout_every_n_epochs cannot be used with --cache_text_encoder_outputs for Anima; "
                        "use caption_dropout_rate"
                    )
                self.dropout_rates[info.key] = float(info.subset.caption_dropout_rate)
                cap = deterministic_caption(info.caption, caption_options(info.subset))
                self.caption_rates[cap] = max(self.caption_rates.get(cap, 0.0), self.dropout_rates[info.key])
            dcache.cache_text_encoder_outputs(
                self.dataset, lambda caps: self.encode_text_for_cache(args, caps),
                to_disk=bool(args.cache_text_encoder_outputs_to_disk),
                batch_size=args.text_encoder_batch_size or 8, suffix=TE_CACHE_SUFFIX, settings=settings,
                allow_caption_dropout=True, **common,
            )  # fmt: skip
            self.text_cached = True
            # not needed any more for training (TE LoRA is impossible with a cache)
            m.text_encoder.to(self._after_cache_device(args))
        released = [
            name for name, done in (("Qwen3", self.text_cached), ("the VAE", args.cache_latents)) if done
        ]
        if released and not args.sample_prompts:
            logger.info("%s: not needed after caching without --sample_prompts, weights released",
                        " and ".join(released))  # fmt: skip
        accelerator.wait_for_everyone()

    @staticmethod
    def _after_cache_device(args: argparse.Namespace) -> str:
        """Where Qwen3 / the VAE go once their outputs are cached: the host, to wait for sampling; with nothing
        to sample, the meta device, which releases their weights (Qwen3-0.6B about 1.2 GB in bf16, the VAE
        about 0.5 GB in fp32) straight from wherever they are, never copied back to the host first. The
        modules stay, for code that walks them."""
        return "cpu" if args.sample_prompts else "meta"

    def prepare_models(self, ctx: RunContext) -> None:
        m, args, device, weight_dtype = self.models, ctx.args, ctx.device, ctx.weight_dtype
        for model in (m.dit, m.text_encoder, m.vae):
            model.requires_grad_(False)
        # Module.to(dtype) would upcast fp8 weights; swapped blocks keep their CPU home (no trip to the device)
        swapped = swapped_blocks(m.dit, args.blocks_to_swap)
        cast_keeping_fp8(m.dit, device, weight_dtype, skip=swapped)
        for blk in swapped:
            cast_keeping_fp8(blk, "cpu", weight_dtype)
        if args.blocks_to_swap:
            enable_block_swap(m.dit, args.blocks_to_swap, device)
        if not self.text_cached:
            m.text_encoder.to(device, weight_dtype)
        if not args.cache_latents:
            m.vae.to(device)
        set_checkpointing_and_modes(
            m.dit, [m.text_encoder], gradient_checkpointing=bool(args.gradient_checkpointing),
            graph_step=ctx.graph_step, train_text_encoder=ctx.train_text_encoder,
        )  # fmt: skip
        m.vae.eval()

    def repeated_blocks(self) -> list[nn.Module]:
        """The DiT's ``Block``s (the LLM adapter's blocks stay eager: small, run once per step)."""
        return list(self.models.dit.blocks)

    # ------------------------------------------------------------------ loss
    def _context(
        self, args: argparse.Namespace, batch: dict[str, Any], weight_dtype: torch.dtype, grad_te: bool
    ):
        dit = self.models.dit
        dev = dit.device
        cached = batch.get("text_encoder_outputs")
        if cached is not None:
            states = cached["prompt_embeds"].to(dev, weight_dtype)
            qmask = cached["attn_mask"].to(dev).long()
            t5_ids, t5_mask = cached["t5_input_ids"].to(dev).long(), cached["t5_attn_mask"].to(dev).long()
            states, qmask, t5_ids, t5_mask = apply_cached_caption_dropout(
                [self.dropout_rates.get(k, 0.0) for k in batch.get("image_keys", [])],
                states,
                qmask,
                t5_ids,
                t5_mask,
            )
        else:
            toks = self._tokens(args, batch["captions"])
            states = self._qwen3_states(toks.qwen_ids, toks.qwen_mask, grad=grad_te).to(dev, weight_dtype)
            qmask, t5_ids, t5_mask = toks.qwen_mask.to(dev), toks.t5_ids.to(dev), toks.t5_mask.to(dev)
        # the adapter is part of the DiT (it may carry LoRA modules), so it runs with grad
        return dit.run_llm_adapter(states, t5_ids, t5_mask, qmask)

    def enable_cuda_graph(self, ctx: RunContext, params: list[nn.Parameter], state_key: Any) -> None:
        self.graphed_dit = GraphedCall(self.models.dit, params, state_key, **training_graph_options(ctx))

    def per_sample_loss(self, ctx: RunContext, batch: dict[str, Any]) -> torch.Tensor:
        args, weight_dtype = ctx.args, ctx.weight_dtype
        weights = batch["loss_weights"].to(ctx.device, torch.float32)
        if self.loss_config is None:
            self.loss_config = FlowLossConfig.from_args(args)
        return flow_matching_loss(
            self.graphed_dit or self.models.dit, self.batch_latents(ctx, batch),
            lambda: self._context(args, batch, weight_dtype, ctx.train_text_encoder), self.loss_config, weights,
            weight_dtype,
        )  # fmt: skip

    # ------------------------------------------------------------------ samples
    def sample_modules(self) -> list[nn.Module]:
        return [self.models.text_encoder, self.models.vae]

    def split_sample_line(self, line: str) -> tuple[str, dict[str, str]]:
        """Anima's flow-shift option ``--fs`` (default 3.0); the shared prompt parser does not know it."""
        fs = re.search(r"\s--fs\s+([0-9.eE+-]+)", line)
        if not fs:
            return line, {"flow-shift": "3.0"}
        return line[: fs.start()] + line[fs.end() :], {"flow-shift": str(float(fs.group(1)))}

    def generate_sample(self, ctx: RunContext, req: SampleRequest) -> tuple[Image.Image, dict[str, str]]:
        from library.anima.loading import anima_decode_latents
        from library.anima.sampling import euler_sample, initial_noise, latents_to_pil

        dit, args = self.models.dit, ctx.args
        dtype, dev = dit.dtype, dit.device

        def context(text: str) -> torch.Tensor:
            toks = self._tokens(args, [text])
            states = self._qwen3_states(toks.qwen_ids, toks.qwen_mask, grad=False)
            return dit.run_llm_adapter(
                states.to(dev, dtype), toks.t5_ids.to(dev), toks.t5_mask.to(dev), toks.qwen_mask.to(dev)
            )

        flow_shift = float(req.extra["flow-shift"])
        with torch.no_grad():
            pos, neg = context(req.prompt), context(req.negative_prompt)
            noise = initial_noise(req.height, req.width, req.run_seed, dtype).to(dev)
            lat = euler_sample(
                dit, noise, pos, neg, req.steps, req.scale, flow_shift, use_cfg=req.scale > 1.0
            )
            image = latents_to_pil(anima_decode_latents(self.models.vae, lat))[0]
        return image, {"flow-shift": str(flow_shift)}
