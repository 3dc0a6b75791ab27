"""Anima DiT + LLM adapter: forward vs an independent, loop-level reference of the spec maths (§1.5, §1.6),
and the adapter vs diffusers' `AnimaTextConditioner` loaded with the same weights."""

from __future__ import annotations

import math

import pytest
import torch

from library.anima.model import Anima, AnimaConfig, anima_config_from_state_dict, tiny_anima_config
from library.anima.text import encode_anima_prompts, encode_qwen3, tokenize_anima_captions


# ------------------------------------------------------------------------------------ reference maths
def _ln(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _attn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    # q (H, Lq, d), k/v (H, Lk, d); mask (Lk,) bool
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        if not mask.any():
            return torch.zeros_like(q)
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v


def _rope_angles(head_dim: int, t: int, h: int, w: int) -> torch.Tensor:
    """(t*h*w, head_dim/2) angles [t | h | w], written out from the spec's formulas."""
    dh = (head_dim // 6) * 2
    dt = head_dim - 2 * dh
    th_hw = 10000.0 * 4.0 ** (dh / (dh - 2))
    th_t = 10000.0 * 1.0 ** (dt / (dt - 2))
    rows = []
    for ti in range(t):
        for hi in range(h):
            for wi in range(w):
                a = [ti * th_t ** (-2 * i / dt) for i in range(dt // 2)]
                a += [hi * th_hw ** (-2 * i / dh) for i in range(dh // 2)]
                a += [wi * th_hw ** (-2 * i / dh) for i in range(dh // 2)]
                rows.append(a)
    return torch.tensor(rows, dtype=torch.float64)


def _rope(x: torch.Tensor, ang: torch.Tensor) -> torch.Tensor:
    # x (H, L, d); pair j with j + d/2
    half = x.shape[-1] // 2
    c, s = ang.cos(), ang.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def reference_dit(
    sd: dict[str, torch.Tensor], cfg: AnimaConfig, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor
) -> torch.Tensor:
    """Straightforward per-sample evaluation of §1.5 on a state dict (keys without `net.`)."""
    b, c, t, hgt, wid = x.shape
    d, nh, hd = cfg.model_channels, cfg.num_heads, cfg.head_dim
    hp, wp = hgt // 2, wid // 2
    outs = []
    for bi in range(b):
        xin = torch.cat([x[bi], torch.zeros(1, t, hgt, wid, dtype=x.dtype)], 0)  # padding-mask channel
        toks = []
        for ti in range(t):
            for hi in range(hp):
                for wi in range(wp):
                    toks.append(
                        torch.stack(
                            [
                                xin[ch, ti, 2 * hi + dy, 2 * wi + dx]
                                for ch in range(c + 1)
                                for dy in range(2)
                                for dx in range(2)
                            ]
                        )
                    )
        tok = torch.stack(toks) @ sd["x_embedder.proj.1.weight"].T  # (L, D)
        f = torch.exp(-math.log(10000.0) * torch.arange(d // 2, dtype=torch.float64) / (d // 2))
        sinus = torch.cat([torch.cos(sigma[bi] * f), torch.sin(sigma[bi] * f)])
        a = (
            torch.nn.functional.silu(sinus @ sd["t_embedder.1.linear_1.weight"].T)
            @ sd["t_embedder.1.linear_2.weight"].T
        )
        e = _rms(sinus, sd["t_embedding_norm.weight"])
        ang = _rope_angles(hd, t, hp, wp)
        for i in range(cfg.num_blocks):
            p = f"blocks.{i}."

            def mod(
                name: str, n: int = 3, p: str = p, e: torch.Tensor = e, a: torch.Tensor = a
            ) -> list[torch.Tensor]:
                m = torch.nn.functional.silu(e) @ sd[p + name + ".1.weight"].T @ sd[p + name + ".2.weight"].T
                return list((m + a[: n * d]).split(d))

            def attention(
                xq: torch.Tensor,
                ctx: torch.Tensor,
                name: str,
                rope: bool,
                p: str = p,
                ang: torch.Tensor = ang,
            ) -> torch.Tensor:
                q = (xq @ sd[p + name + ".q_proj.weight"].T).view(-1, nh, hd).transpose(0, 1)
                k = (ctx @ sd[p + name + ".k_proj.weight"].T).view(-1, nh, hd).transpose(0, 1)
                v = (ctx @ sd[p + name + ".v_proj.weight"].T).view(-1, nh, hd).transpose(0, 1)
                q, k = _rms(q, sd[p + name + ".q_norm.weight"]), _rms(k, sd[p + name + ".k_norm.weight"])
                if rope:
                    q, k = _rope(q, ang), _rope(k, ang)
                o = _attn(q, k, v).transpose(0, 1).reshape(-1, nh * hd)
                return o @ sd[p + name + ".output_proj.weight"].T

            sh, sc, g = mod("adaln_modulation_self_attn")
            y = _ln(tok) * (1 + sc) + sh
            tok = tok + g * attention(y, y, "self_attn", True)
            sh, sc, g = mod("adaln_modulation_cross_attn")
            tok = tok + g * attention(_ln(tok) * (1 + sc) + sh, context[bi], "cross_attn", False)
            sh, sc, g = mod("adaln_modulation_mlp")
            y = _ln(tok) * (1 + sc) + sh
            hmid = torch.nn.functional.gelu(y @ sd[p + "mlp.layer1.weight"].T)
            tok = tok + g * (hmid @ sd[p + "mlp.layer2.weight"].T)
        m = torch.nn.functional.silu(e) @ sd["final_layer.adaln_modulation.1.weight"].T
        m = m @ sd["final_layer.adaln_modulation.2.weight"].T + a[: 2 * d]
        sh, sc = m.split(d)
        fo = (_ln(tok) * (1 + sc) + sh) @ sd["final_layer.linear.weight"].T  # (L, 64)
        out = torch.zeros(c, t, hgt, wid, dtype=x.dtype)
        li = 0
        for ti in range(t):
            for hi in range(hp):
                for wi in range(wp):
                    for dy in range(2):
                        for dx in range(2):
                            for ch in range(c):
                                out[ch, ti, 2 * hi + dy, 2 * wi + dx] = fo[li, (dy * 2 + dx) * c + ch]
                    li += 1
        outs.append(out)
    return torch.stack(outs)


# ------------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def tiny_models(tokenizers_dir):
    from library.anima.loading import build_tiny_anima_models

    return build_tiny_anima_models(tokenizers_dir, seed=0)


@pytest.fixture(scope="module")
def tiny_dit() -> Anima:
    torch.manual_seed(1)
    dit = Anima(tiny_anima_config())
    with torch.no_grad():  # random norms and bigger modulation so every term matters numerically
        for name, prm in dit.named_parameters():
            if "norm" in name:
                prm.copy_(1.0 + 0.2 * torch.randn_like(prm))
            elif "adaln_modulation" in name or "t_embedder" in name:
                prm.mul_(3.0)
    return dit.double().eval()


def test_dit_forward_matches_reference_maths(tiny_dit: Anima) -> None:
    torch.manual_seed(2)
    x = torch.randn(2, 16, 1, 8, 6, dtype=torch.float64)  # non-square: catches h/w swaps in RoPE/patchify
    sigma = torch.tensor([0.25, 0.9], dtype=torch.float64)
    ctx = torch.randn(2, 5, 32, dtype=torch.float64)
    with torch.no_grad():
        ours = tiny_dit(x, sigma, ctx)
    sd = {k: v.double() for k, v in tiny_dit.state_dict().items()}
    ref = reference_dit(sd, tiny_dit.config, x, sigma, ctx)
    assert ours.shape == (2, 16, 1, 8, 6)
    assert ref.abs().max() > 1e-2  # the check is not vacuous
    assert (ours - ref).abs().max().item() <= 1e-5


def test_dit_forward_depends_on_every_input(tiny_dit: Anima) -> None:
    torch.manual_seed(3)
    x = torch.randn(1, 16, 1, 8, 8, dtype=torch.float64)
    ctx = torch.randn(1, 4, 32, dtype=torch.float64)
    s = torch.tensor([0.5], dtype=torch.float64)
    with torch.no_grad():
        base = tiny_dit(x, s, ctx)
        assert (tiny_dit(x, s + 0.1, ctx) - base).abs().max() > 1e-4
        assert (tiny_dit(x, s, ctx * 0.5) - base).abs().max() > 1e-4
        # zero-padded context rows take part in the (unmasked) cross-attention softmax
        padded = torch.cat([ctx, ctx.new_zeros(1, 512 - 4, 32)], dim=1)
        assert (tiny_dit(x, s, padded) - base).abs().max() > 1e-4
        # a padding mask of ones changes the 17th input channel
        assert (
            tiny_dit(x, s, ctx, padding_mask=torch.ones(1, 1, 8, 8, dtype=torch.float64)) - base
        ).abs().max() > 0


def test_dit_gradient_checkpointing_same_grads(tiny_dit: Anima) -> None:
    torch.manual_seed(4)
    dit = Anima(tiny_anima_config())
    x, ctx, s = torch.randn(1, 16, 1, 4, 4), torch.randn(1, 3, 32), torch.tensor([0.3])
    grads = []
    for gc in (False, True):
        dit.zero_grad()
        dit.gradient_checkpointing = gc
        dit(x, s, ctx).square().mean().backward()
        grads.append(dit.blocks[0].self_attn.q_proj.weight.grad.clone())
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1])


def test_dit_rejects_bad_shapes(tiny_dit: Anima) -> None:
    ctx = torch.zeros(1, 4, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="divisible"):
        tiny_dit(torch.zeros(1, 16, 1, 7, 8, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), ctx)
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        tiny_dit(torch.zeros(1, 16, 8, 8, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), ctx)
    with pytest.raises(ValueError, match="RoPE maximum"):  # tiny max is 64 px latents -> 32 patches
        tiny_dit(torch.zeros(1, 16, 1, 8, 80, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), ctx)


def test_adapter_matches_diffusers_text_conditioner(tiny_dit: Anima) -> None:
    from diffusers import AnimaTextConditioner

    cfg = tiny_dit.config
    ref = AnimaTextConditioner(
        source_dim=cfg.adapter_source_dim,
        target_dim=cfg.adapter_target_dim,
        model_dim=cfg.adapter_model_dim,
        num_layers=cfg.adapter_num_layers,
        num_attention_heads=cfg.adapter_num_heads,
        target_vocab_size=cfg.adapter_vocab_size,
        min_sequence_length=1,
    ).double()
    missing, unexpected = ref.load_state_dict(tiny_dit.llm_adapter.state_dict(), strict=True)
    assert not missing and not unexpected  # same key layout as diffusers'
    torch.manual_seed(5)
    src = torch.randn(2, 7, 32, dtype=torch.float64)
    src_mask = torch.tensor([[1] * 5 + [0] * 2, [0] * 7])  # second prompt empty: fully masked cross-attn
    ids = torch.randint(0, 32128, (2, 6))
    tgt_mask = torch.tensor([[1] * 4 + [0] * 2, [1] + [0] * 5])
    with torch.no_grad():
        ours = tiny_dit.run_llm_adapter(src, ids, tgt_mask, src_mask)
        theirs = ref(src, ids, tgt_mask, src_mask)
    assert not ours.isnan().any()
    assert ours[0, :4].abs().min() >= 0 and ours[0, :4].abs().max() > 1e-3
    assert torch.equal(ours[0, 4:], torch.zeros_like(ours[0, 4:]))
    assert (ours - theirs).abs().max().item() <= 1e-6


def test_config_inferred_from_tensors_for_other_variants() -> None:
    cfg = AnimaConfig(
        model_channels=96,
        num_blocks=3,
        num_heads=6,
        mlp_hidden=192,
        crossattn_emb_channels=40,
        adaln_lora_dim=8,
        adapter_source_dim=40,
        adapter_target_dim=40,
        adapter_model_dim=40,
        adapter_num_layers=1,
        adapter_num_heads=2,
        adapter_mlp_hidden=24,
        adapter_vocab_size=100,
    )
    got = anima_config_from_state_dict(Anima(cfg).state_dict())
    for f in (
        "model_channels",
        "num_blocks",
        "num_heads",
        "mlp_hidden",
        "crossattn_emb_channels",
        "adaln_lora_dim",
        "adapter_source_dim",
        "adapter_num_layers",
        "adapter_num_heads",
        "adapter_mlp_hidden",
        "adapter_vocab_size",
        "in_channels",
        "out_channels",
    ):
        assert getattr(got, f) == getattr(cfg, f), f


def test_real_config_shapes_on_meta_device() -> None:
    with torch.device("meta"):
        dit = Anima(AnimaConfig())
    sd = dit.state_dict()
    assert len(sd) == 685
    assert (
        sum(k.startswith("blocks.") for k in sd) == 560
        and sum(k.startswith("llm_adapter.") for k in sd) == 118
    )
    shapes = {
        "x_embedder.proj.1.weight": (2048, 68), "t_embedder.1.linear_2.weight": (6144, 2048),
        "blocks.27.cross_attn.k_proj.weight": (2048, 1024), "blocks.0.self_attn.q_norm.weight": (128,),
        "blocks.3.mlp.layer1.weight": (8192, 2048), "blocks.3.adaln_modulation_mlp.2.weight": (6144, 256),
        "final_layer.linear.weight": (64, 2048), "final_layer.adaln_modulation.2.weight": (4096, 256),
        "llm_adapter.embed.weight": (32128, 1024), "llm_adapter.blocks.5.mlp.0.bias": (4096,),
        "llm_adapter.blocks.0.cross_attn.q_norm.weight": (64,), "llm_adapter.out_proj.bias": (1024,),
    }  # fmt: skip
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s, k
    assert anima_config_from_state_dict(sd) == AnimaConfig()
    assert abs(sum(p.numel() for p in dit.parameters()) / 1e9 - 2.091) < 0.001


def test_encode_prompts_masks_and_lengths(tiny_models) -> None:
    m = tiny_models
    caps = ["a cat sitting on a mat, best quality", ""]
    toks = tokenize_anima_captions(m.qwen_tokenizer, m.t5_tokenizer, caps, 16, 16)
    assert toks.qwen_ids[1].eq(151643).all() and toks.qwen_mask[1].sum() == 0  # no BOS/EOS, pad=<|endoftext|>
    n5 = int(toks.t5_mask[0].sum())
    assert toks.t5_ids[0, n5 - 1] == 1 and toks.t5_ids[1, 0] == 1 and toks.t5_ids[1, 1:].eq(0).all()
    states = encode_qwen3(m.text_encoder, toks.qwen_ids, toks.qwen_mask)
    nq = int(toks.qwen_mask[0].sum())
    assert states[0, :nq].abs().max() > 0 and states[0, nq:].abs().max() == 0 and states[1].abs().max() == 0
    ctx = encode_anima_prompts(m, caps, max_length=16)
    assert ctx.shape == (2, 16, 32) and not ctx.isnan().any()
    assert ctx[0, :n5].abs().amin(-1).min() >= 0 and ctx[0, n5 - 1].abs().max() > 0
    assert ctx[0, n5:].abs().max() == 0 and ctx[1, 1:].abs().max() == 0 and ctx[1, 0].abs().max() > 0
    ctx512 = encode_anima_prompts(m, caps[:1], max_length=512)
    assert ctx512.shape == (1, 512, 32)
    torch.testing.assert_close(ctx512[0, :n5], ctx[0, :n5], rtol=1e-4, atol=1e-5)


def test_dit_half_precision_paths_track_fp32() -> None:
    torch.manual_seed(6)
    dit = Anima(tiny_anima_config()).eval()
    x, ctx, s = torch.randn(1, 16, 1, 8, 8), torch.randn(1, 6, 32), torch.tensor([0.6])
    with torch.no_grad():
        ref = dit(x, s, ctx)
        with torch.autocast(
            "cpu", dtype=torch.bfloat16
        ):  # fp32 weights, bf16 matmuls (mixed precision training)
            amp = dit(x, s.bfloat16(), ctx.bfloat16())
        bf = Anima(tiny_anima_config()).eval()
        bf.load_state_dict(dit.state_dict())
        half = bf.to(torch.bfloat16)(x, s, ctx)  # bf16 weights, fp32 inputs are cast to the weight dtype
    assert half.dtype == torch.bfloat16
    for out in (amp, half):
        assert torch.isfinite(out).all()
        assert ((out.float() - ref).norm() / ref.norm()).item() < 0.05


def _to_diffusers_cosmos(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (= released) DiT names -> diffusers CosmosTransformer3DModel names (adapter left out)."""
    top = {
        "x_embedder.proj.1.weight": "patch_embed.proj.weight",
        "t_embedder.1.linear_1.weight": "time_embed.t_embedder.linear_1.weight",
        "t_embedder.1.linear_2.weight": "time_embed.t_embedder.linear_2.weight",
        "t_embedding_norm.weight": "time_embed.norm.weight",
        "final_layer.linear.weight": "proj_out.weight",
        "final_layer.adaln_modulation.1.weight": "norm_out.linear_1.weight",
        "final_layer.adaln_modulation.2.weight": "norm_out.linear_2.weight",
    }
    inner = {
        "self_attn.q_proj": "attn1.to_q", "self_attn.k_proj": "attn1.to_k", "self_attn.v_proj": "attn1.to_v",
        "self_attn.output_proj": "attn1.to_out.0", "self_attn.q_norm": "attn1.norm_q",
        "self_attn.k_norm": "attn1.norm_k", "cross_attn.q_proj": "attn2.to_q", "cross_attn.k_proj": "attn2.to_k",
        "cross_attn.v_proj": "attn2.to_v", "cross_attn.output_proj": "attn2.to_out.0",
        "cross_attn.q_norm": "attn2.norm_q", "cross_attn.k_norm": "attn2.norm_k", "mlp.layer1": "ff.net.0.proj",
        "mlp.layer2": "ff.net.2", "adaln_modulation_self_attn.1": "norm1.linear_1",
        "adaln_modulation_self_attn.2": "norm1.linear_2", "adaln_modulation_cross_attn.1": "norm2.linear_1",
        "adaln_modulation_cross_attn.2": "norm2.linear_2", "adaln_modulation_mlp.1": "norm3.linear_1",
        "adaln_modulation_mlp.2": "norm3.linear_2",
    }  # fmt: skip
    out = {}
    for k, v in sd.items():
        if k.startswith("llm_adapter."):
            continue
        if k in top:
            out[top[k]] = v
            continue
        _, i, rest = k.split(".", 2)
        mod, _, param = rest.rpartition(".")
        out[f"transformer_blocks.{i}.{inner[mod]}.{param}"] = v
    return out


def test_dit_matches_diffusers_cosmos_transformer(tiny_dit: Anima) -> None:
    """Second oracle: diffusers' Cosmos DiT with the same weights. Its padding-mask path needs torchvision,
    so the zero mask channel is fed as `condition_mask` (same 17th input channel)."""
    from diffusers import CosmosTransformer3DModel

    cfg = tiny_dit.config
    ref = CosmosTransformer3DModel(
        in_channels=17, out_channels=16, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        num_layers=cfg.num_blocks, mlp_ratio=cfg.mlp_hidden / cfg.model_channels,
        text_embed_dim=cfg.crossattn_emb_channels, adaln_lora_dim=cfg.adaln_lora_dim, max_size=(1, 64, 64),
        patch_size=(1, 2, 2), rope_scale=(1.0, 4.0, 4.0), concat_padding_mask=False, extra_pos_embed_type=None,
    ).double()  # fmt: skip
    ref.load_state_dict(_to_diffusers_cosmos(tiny_dit.state_dict()), strict=True)
    torch.manual_seed(7)
    x = torch.randn(2, 16, 1, 6, 10, dtype=torch.float64)
    sigma = torch.tensor([0.1, 0.75], dtype=torch.float64)
    ctx = torch.randn(2, 9, 32, dtype=torch.float64)
    with torch.no_grad():
        ours = tiny_dit(x, sigma, ctx)
        theirs = ref(x, sigma, ctx, condition_mask=torch.zeros(2, 1, 1, 6, 10, dtype=torch.float64)).sample
    assert ours.abs().max() > 1e-2
    # both sides build their RoPE/sinusoid tables in fp32: agreement to 1e-5 of the output scale
    assert ((ours - theirs).abs().max() / ours.abs().max()).item() <= 1e-5


def test_dit_runs_adapter_when_given_t5_ids(tiny_dit: Anima) -> None:
    torch.manual_seed(8)
    x, s = torch.randn(1, 16, 1, 4, 4, dtype=torch.float64), torch.tensor([0.4], dtype=torch.float64)
    states, ids = torch.randn(1, 5, 32, dtype=torch.float64), torch.randint(0, 32128, (1, 6))
    smask, tmask = torch.tensor([[1, 1, 1, 0, 0]]), torch.tensor([[1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        ctx = tiny_dit.run_llm_adapter(states, ids, tmask, smask)
        direct = tiny_dit(
            x, s, states, target_input_ids=ids, target_attention_mask=tmask, source_attention_mask=smask
        )
        assert torch.equal(direct, tiny_dit(x, s, ctx))
        assert ctx[0, 4:].abs().max() == 0 and ctx[0, :4].abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dit_rmsnorm_equals_the_spelled_out_maths(dtype: torch.dtype) -> None:
    """The fused rms_norm gives x·rsqrt(mean(x²)+eps) computed in fp32 and rounded once to x's dtype, then
    the weight product in x's dtype: forward and backward within one rounding of that dtype (the kernels'
    reductions may sum in another order), with autocast on or off."""
    from library.anima.layers import RMSNorm

    gen = torch.Generator().manual_seed(3)
    norm = RMSNorm(64).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(64, generator=gen))
    x = (3 * torch.randn(2, 40, 4, 64, generator=gen)).to(dtype)
    g = torch.randn(x.shape, generator=gen).to(dtype)

    def spelled_out(t: torch.Tensor) -> torch.Tensor:
        tf = t.float()
        return (tf * torch.rsqrt(tf.pow(2).mean(-1, keepdim=True) + norm.eps)).to(dtype) * norm.weight

    ulp = torch.finfo(dtype).eps
    ref_in = x.clone().requires_grad_()
    ref = spelled_out(ref_in)
    ref.backward(g)
    for amp in (False, True):
        x_in = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = norm(x_in)
        out.backward(g)
        assert out.dtype == dtype
        err = (out.float() - ref.float()).abs().max() / ref.float().abs().max()
        gerr = (x_in.grad.float() - ref_in.grad.float()).abs().max() / ref_in.grad.float().abs().max()
        assert err <= 2 * ulp and gerr <= 4 * ulp, (amp, float(err), float(gerr))


def test_adaln_modulate_is_the_separate_product_and_sum() -> None:
    """fp32 (autocast's LayerNorm output): one fused pass, within one fp32 rounding of h·(1+scale)+shift;
    half precision: the same two roundings as the separate ops, bit for bit. Grads likewise."""
    from library.anima.model import modulate

    gen = torch.Generator().manual_seed(5)
    scale, shift = (torch.randn(2, 1, 32, generator=gen).bfloat16() for _ in range(2))
    for dtype, tol in ((torch.float32, 2 * torch.finfo(torch.float32).eps), (torch.bfloat16, 0.0)):
        h = (4 * torch.randn(2, 30, 32, generator=gen)).to(dtype)
        args = [t.clone().requires_grad_() for t in (h, scale, shift)]
        ref_args = [t.clone().requires_grad_() for t in (h, scale, shift)]
        out = modulate(*args)
        ref = ref_args[0] * (1 + ref_args[1]) + ref_args[2]
        assert out.dtype == ref.dtype == dtype
        g = torch.randn(out.shape, generator=gen).to(dtype)
        out.backward(g)
        ref.backward(g)
        scale_of = ref.detach().float().abs().max()
        assert (out.detach().float() - ref.detach().float()).abs().max() <= tol * scale_of, dtype
        for a, b in zip(args, ref_args):
            assert torch.allclose(
                a.grad.float(), b.grad.float(), rtol=tol, atol=tol * b.grad.float().abs().max()
            )
