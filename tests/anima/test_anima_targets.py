"""Anima network targeting (networks.md §2, anima.md §4): exact golden module names on the tiny model,
the real-config counts and parameter totals on the meta device, and detection by structure."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import Qwen3Config, Qwen3ForCausalLM

from library.anima.loading import tiny_qwen3_config
from library.anima.model import Anima, AnimaConfig, tiny_anima_config
from networks import lokr, lora
from networks.arch import detect_architecture
from networks.arch.anima import ANIMA, is_anima_dit

DIT_LEAVES = [
    f"{a}_{p}" for a in ("self_attn", "cross_attn") for p in ("q_proj", "k_proj", "v_proj", "output_proj")
]
DIT_LEAVES += ["mlp_layer1", "mlp_layer2"]
ADAPTER_LEAVES = [
    f"{a}_{p}" for a in ("self_attn", "cross_attn") for p in ("q_proj", "k_proj", "v_proj", "o_proj")
]
ADAPTER_LEAVES += ["mlp_0", "mlp_2"]
TE_LEAVES = [f"self_attn_{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
TE_LEAVES += [f"mlp_{p}" for p in ("gate_proj", "up_proj", "down_proj")]


def golden(n_blocks: int, n_adapter: int, n_te: int) -> set[str]:
    names = {f"lora_unet_blocks_{i}_{leaf}" for i in range(n_blocks) for leaf in DIT_LEAVES}
    names |= {f"lora_unet_llm_adapter_blocks_{j}_{leaf}" for j in range(n_adapter) for leaf in ADAPTER_LEAVES}
    names |= {f"lora_te_layers_{i}_{leaf}" for i in range(n_te) for leaf in TE_LEAVES}
    return names


def names_of(net: nn.Module) -> set[str]:
    return {m.lora_name for m in net.all_loras}


@pytest.fixture(scope="module")
def tiny() -> tuple[Anima, nn.Module]:
    torch.manual_seed(0)
    return Anima(tiny_anima_config()), Qwen3ForCausalLM(tiny_qwen3_config(vocab_size=64)).model


def test_tiny_golden_names_dit_adapter_te(tiny) -> None:
    dit, te = tiny
    net = lora.create_network(1.0, 4, 1.0, None, None, dit)
    assert names_of(net) == golden(2, 0, 0) and len(names_of(net)) == 20
    net = lora.create_network(1.0, 4, 1.0, None, None, dit, train_llm_adapter="true")
    assert names_of(net) == golden(2, 2, 0) and len(names_of(net)) == 40
    net = lora.create_network(1.0, 4, 1.0, None, [te], dit)
    assert names_of(net) == golden(2, 0, 2) and len(names_of(net)) == 34
    net = lora.create_network(1.0, 4, 1.0, None, [te], None)  # TE only: detected from the Qwen3 class
    assert names_of(net) == golden(0, 0, 2)
    for must in ("lora_unet_blocks_0_self_attn_q_proj", "lora_unet_blocks_1_mlp_layer2",
                 "lora_unet_llm_adapter_blocks_0_cross_attn_k_proj", "lora_te_layers_0_mlp_up_proj"):  # fmt: skip
        assert must in golden(2, 2, 2)


def test_default_exclude_and_include_override(tiny) -> None:
    dit, _ = tiny
    # Re-admitting everything shows what the default exclude removes: modulation, embedders, final layer.
    net = lora.create_network(1.0, 4, 1.0, None, None, dit, include_patterns="[r'.*']")
    extra = names_of(net) - golden(2, 0, 0)
    expected = {f"lora_unet_blocks_{i}_adaln_modulation_{m}_{j}" for i in range(2)
                for m in ("self_attn", "cross_attn", "mlp") for j in (1, 2)}  # fmt: skip
    expected |= {"lora_unet_x_embedder_proj_1", "lora_unet_t_embedder_1_linear_1", "lora_unet_t_embedder_1_linear_2",
                 "lora_unet_final_layer_linear", "lora_unet_final_layer_adaln_modulation_1",
                 "lora_unet_final_layer_adaln_modulation_2"}  # fmt: skip
    assert extra == expected
    # the adapter's out_proj / embed are never targets (not inside LLMAdapterTransformerBlock)
    net = lora.create_network(
        1.0, 4, 1.0, None, None, dit, train_llm_adapter="true", include_patterns="[r'.*']"
    )
    assert not any("out_proj" in n or "embed_" in n for n in names_of(net) if "llm_adapter" in n)


def test_lora_forward_hooks_reach_the_dit(tiny) -> None:
    dit, _ = tiny
    net = lora.create_network(1.0, 4, 1.0, None, None, dit)
    net.apply_to(None, dit, apply_text_encoder=False, apply_unet=True)
    try:
        for m in net.all_loras:  # make the (zero-initialised) up matrices non-zero
            with torch.no_grad():
                m.lora_up.weight.normal_()
        x, ctx, s = torch.randn(1, 16, 1, 4, 4), torch.randn(1, 3, 32), torch.tensor([0.5])
        with torch.no_grad():
            net.set_multiplier(0.0)
            base = dit(x, s, ctx)
            net.set_multiplier(1.0)
            changed = dit(x, s, ctx)
        assert (changed - base).abs().max() > 1e-3
    finally:
        net.remove_from()


def test_detection_is_structural_not_any_block() -> None:
    class Block(nn.Module):  # a lone class called Block is not Anima
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

    class NotAnima(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([Block()])

    assert not is_anima_dit(NotAnima())
    with pytest.raises(ValueError, match="not a supported architecture"):
        detect_architecture([None], NotAnima())
    with torch.device("meta"):
        assert detect_architecture([None], Anima(AnimaConfig())) is ANIMA


def test_real_config_counts_and_params_on_meta() -> None:
    with torch.device("meta"):
        dit = Anima(AnimaConfig())
        te = Qwen3ForCausalLM(Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                                          num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                                          head_dim=128, tie_word_embeddings=True)).model  # fmt: skip
        net = lora.create_network(1.0, 32, 16.0, None, None, dit)
        assert names_of(net) == golden(28, 0, 0) and len(names_of(net)) == 280
        assert sum(p.numel() for p in net.parameters() if p.ndim > 0) == 45_875_200
        net = lora.create_network(1.0, 32, 16.0, None, None, dit, train_llm_adapter=True)
        assert names_of(net) == golden(28, 6, 0) and len(names_of(net)) == 340
        net = lora.create_network(1.0, 32, 16.0, None, [te], None)
        assert names_of(net) == golden(0, 0, 28) and len(names_of(net)) == 196
        net = lokr.create_network(1.0, 32, 16.0, None, None, dit)
        assert len(net.all_loras) == 280
        assert sum(p.numel() for p in net.parameters() if p.ndim > 0) == 1_490_944
        n_full = sum(1 for m in net.all_loras if any(k.endswith("lokr_w2") for k, _ in m.named_parameters()))
        assert n_full == 224


@pytest.mark.parametrize("module", [lora, lokr])
def test_file_names_round_trip_from_weights(tiny, module, tmp_path) -> None:
    """Saved keys carry the golden names; reloading infers train_llm_adapter and the TE from the names."""
    dit, te = tiny
    net = module.create_network(1.0, 4, 2.0, None, [te], dit, train_llm_adapter=True)
    net.save_weights(str(tmp_path / "a.safetensors"), torch.float32, {"ss_network_dim": "4"})
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "a.safetensors"))
    assert {k.split(".")[0] for k in sd} == golden(2, 2, 2)
    net2, _ = module.create_network_from_weights(1.0, str(tmp_path / "a.safetensors"), None, [te], dit)
    assert names_of(net2) == golden(2, 2, 2)
    # An SDXL-named file matches no Anima layer: an error naming the key, not a silent no-op.
    bad = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 8),
           "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(8, 4)}  # fmt: skip
    with pytest.raises(KeyError, match="input_blocks_4_1_transformer_blocks_0_attn1_to_q"):
        module.create_network_from_weights(1.0, None, None, [te], dit, weights_sd=bad)
