"""sd-scripts <-> ComfyUI converter for Anima LoRA/LoHa/LoKr files."""

from __future__ import annotations

import torch
from diffusers import CosmosTransformer3DModel
from diffusers.loaders import AnimaLoraLoaderMixin
from diffusers.models.condition_embedders.condition_embedder_anima import AnimaTextConditioner
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import Qwen3Model

from library.anima.loading import tiny_qwen3_config
from library.anima.model import Anima, tiny_anima_config
from networks import convert_anima_lora_to_comfy as conv
from networks.network_io import sshs_hashes


def _tiny_trees() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    cfg = tiny_qwen3_config(vocab_size=64)
    return Anima(tiny_anima_config()), Qwen3Model(cfg)


def _leaves(root: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in root.named_modules() if isinstance(m, nn.Linear)}


def _diffusers_transformer() -> CosmosTransformer3DModel:
    """diffusers' Anima DiT with the shapes of our tiny config."""
    c = tiny_anima_config()
    return CosmosTransformer3DModel(
        num_attention_heads=c.num_heads,
        attention_head_dim=c.head_dim,
        num_layers=c.num_blocks,
        text_embed_dim=c.crossattn_emb_channels,
        adaln_lora_dim=c.adaln_lora_dim,
        max_size=(c.max_frames, c.max_img_h, c.max_img_w),
        extra_pos_embed_type=None,
    )


def _convert_with_baked_alpha(tmp_path, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`sd` written, converted by the CLI with --bake_alpha, and the ComfyUI file read back."""
    src, dst = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(sd, str(src))
    assert conv.main(["--input", str(src), "--output", str(dst), "--bake_alpha"]) == 0
    with safe_open(str(dst), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _make_file(algo: str, rank: int = 2) -> dict[str, torch.Tensor]:
    """One adapter per Linear leaf of the DiT (incl. modulation, embedders, adapter) and of Qwen3."""
    dit, te = _tiny_trees()
    g = torch.Generator().manual_seed(1)
    sd: dict[str, torch.Tensor] = {}
    for prefix, root in (("lora_unet", dit), ("lora_te", te)):
        for path, lin in _leaves(root).items():
            name = prefix + "_" + path.replace(".", "_")
            o, i = lin.weight.shape
            if algo == "lora":
                sd[name + ".lora_down.weight"] = torch.randn(rank, i, generator=g)
                sd[name + ".lora_up.weight"] = torch.randn(o, rank, generator=g)
            elif algo == "loha":
                for k, shp in (
                    ("w1_a", (o, rank)),
                    ("w1_b", (rank, i)),
                    ("w2_a", (o, rank)),
                    ("w2_b", (rank, i)),
                ):
                    sd[f"{name}.hada_{k}"] = torch.randn(*shp, generator=g)
            else:
                sd[name + ".lokr_w1"] = torch.randn(2, 2, generator=g)
                sd[name + ".lokr_w2_a"] = torch.randn(o // 2, rank, generator=g)
                sd[name + ".lokr_w2_b"] = torch.randn(rank, i // 2, generator=g)
            sd[name + ".alpha"] = torch.tensor(1.5)
    return sd


def test_round_trip_identity_all_algorithms(tmp_path):
    for algo in ("lora", "loha", "lokr"):
        sd = _make_file(algo)
        comfy = conv.to_comfy(sd)
        assert len(comfy) == len(sd)
        back = conv.from_comfy(comfy)
        assert set(back) == set(sd), algo
        for k in sd:
            assert torch.equal(back[k], sd[k]), k
        # the same through the files and the CLI (both argument styles), metadata kept
        src = tmp_path / f"{algo}.safetensors"
        save_file(
            sd, str(src), metadata={"ss_network_module": f"networks.{algo}", "sshs_model_hash": "stale"}
        )
        mid, dst = tmp_path / f"{algo}_comfy.safetensors", tmp_path / f"{algo}_back.safetensors"
        assert conv.main(["--input", str(src), "--output", str(mid)]) == 0
        assert conv.main([str(mid), str(dst), "--reverse"]) == 0
        with safe_open(str(dst), "pt") as f:
            meta = f.metadata()
            assert {k: f.get_tensor(k).tolist() for k in f.keys()} == {k: v.tolist() for k, v in sd.items()}
        assert meta["ss_network_module"] == f"networks.{algo}"
        assert meta["sshs_model_hash"] != "stale" and len(meta["sshs_model_hash"]) == 64
        assert meta["sshs_model_hash"] == sshs_hashes(sd, meta)[0]


def test_underscore_names_map_to_real_modules():
    sd = {
        "lora_unet_blocks_27_adaln_modulation_self_attn_1.lora_down.weight": torch.zeros(1, 1),
        "lora_unet_blocks_3_adaln_modulation_cross_attn_2.alpha": torch.tensor(1.0),
        "lora_unet_t_embedder_1_linear_1.lora_up.weight": torch.zeros(1, 1),
        "lora_unet_x_embedder_proj_1.hada_w1_a": torch.zeros(1, 1),
        "lora_unet_final_layer_adaln_modulation_1.lokr_w1": torch.zeros(1, 1),
        "lora_unet_llm_adapter_blocks_5_mlp_0.lora_down.weight": torch.zeros(1, 1),
        "lora_unet_llm_adapter_out_proj.alpha": torch.tensor(1.0),
        "lora_unet_blocks_27_mlp_layer2.lora_up.weight": torch.zeros(1, 1),
        "lora_te_layers_0_mlp_up_proj.lora_down.weight": torch.zeros(1, 1),
        "lora_te_layers_27_self_attn_o_proj.alpha": torch.tensor(1.0),
    }
    got = set(conv.to_comfy(sd))
    assert got == {
        "diffusion_model.blocks.27.adaln_modulation_self_attn.1.lora_A.weight",
        "diffusion_model.blocks.3.adaln_modulation_cross_attn.2.alpha",
        "diffusion_model.t_embedder.1.linear_1.lora_B.weight",
        "diffusion_model.x_embedder.proj.1.hada_w1_a",
        "diffusion_model.final_layer.adaln_modulation.1.lokr_w1",
        "diffusion_model.llm_adapter.blocks.5.mlp.0.lora_A.weight",
        "diffusion_model.llm_adapter.out_proj.alpha",
        "diffusion_model.blocks.27.mlp.layer2.lora_B.weight",
        "text_encoders.qwen3_06b.transformer.model.layers.0.mlp.up_proj.lora_A.weight",
        "text_encoders.qwen3_06b.transformer.model.layers.27.self_attn.o_proj.alpha",
    }


def test_unknown_module_is_an_error_not_a_guess():
    for bad, fn in (
        ({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(1)}, conv.to_comfy),
        ({"diffusion_model.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(1)}, conv.from_comfy),
    ):
        try:
            fn(bad)
        except conv.ConversionError as e:
            assert "name no Anima module" in str(e)
        else:
            raise AssertionError("expected ConversionError")
    # unknown prefixes are copied unchanged (with a warning)
    assert set(conv.to_comfy({"foo.bar": torch.zeros(1)})) == {"foo.bar"}


def test_converted_file_loads_in_diffusers_anima_loader(tmp_path):
    """diffusers renames our ComfyUI keys; every renamed key must name a real Linear of the right shape."""
    sd = {k: v for k, v in _make_file("lora").items() if k.startswith("lora_unet_")}
    comfy = _convert_with_baked_alpha(tmp_path, sd)
    assert not any(k.endswith(".alpha") for k in comfy)
    # baking keeps the strength: B'@A == alpha/r * up@down (r = 2, alpha = 1.5)
    k = "diffusion_model.blocks.1.self_attn.q_proj"
    n = "lora_unet_blocks_1_self_attn_q_proj"
    want = 0.75 * sd[n + ".lora_up.weight"] @ sd[n + ".lora_down.weight"]
    torch.testing.assert_close(comfy[k + ".lora_B.weight"] @ comfy[k + ".lora_A.weight"], want)

    diff_sd = AnimaLoraLoaderMixin.lora_state_dict(comfy)
    assert len(diff_sd) == len(comfy)
    assert all("lora" in key for key in diff_sd)  # diffusers' own format check in load_lora_weights
    with torch.device("meta"):
        models = {
            "transformer": _diffusers_transformer(),
            "text_conditioner": AnimaTextConditioner(
                source_dim=32, target_dim=32, model_dim=32, num_layers=2, num_attention_heads=4
            ),
        }
    consumed = 0
    for key, val in diff_sd.items():
        owner, rest = key.split(".", 1)
        path, kind = rest.rsplit(".", 2)[0], rest.rsplit(".", 2)[1]
        lin = models[owner].get_submodule(path)
        assert isinstance(lin, nn.Linear), key
        if kind == "lora_A":
            assert val.shape[1] == lin.in_features, key
        else:
            assert kind == "lora_B" and val.shape[0] == lin.out_features, key
        consumed += 1
    assert consumed == len(comfy)
    # the adapter keys went to the text conditioner, the rest to the transformer
    owners = {k.split(".", 1)[0] for k in diff_sd}
    assert owners == {"transformer", "text_conditioner"}


def test_converted_file_loads_into_diffusers_transformer_with_peft(tmp_path):
    """A converted DiT LoRA goes through AnimaLoraLoaderMixin.load_lora_into_transformer (peft) with every
    key consumed, and each adapted diffusers Linear then adds exactly our (alpha/r)·up·down to its output."""
    from peft.utils import get_peft_model_state_dict

    sd = {k: v for k, v in _make_file("lora").items() if k.startswith("lora_unet_blocks_")}
    comfy = _convert_with_baked_alpha(tmp_path, sd)
    diff_sd = AnimaLoraLoaderMixin.lora_state_dict(comfy)
    transformer_sd = {k.split(".", 1)[1]: v for k, v in diff_sd.items() if k.startswith("transformer.")}
    assert len(transformer_sd) == len(comfy) == len(diff_sd)

    torch.manual_seed(0)
    transformer = _diffusers_transformer()
    AnimaLoraLoaderMixin.load_lora_into_transformer(
        {"transformer." + k: v for k, v in transformer_sd.items()}, transformer=transformer
    )
    (adapter,) = transformer.peft_config  # diffusers names the first adapter itself
    loaded = get_peft_model_state_dict(transformer, adapter_name=adapter)
    assert len(loaded) == len(transformer_sd)  # every key of the file became a peft weight

    # each adapted layer adds x·ΔWᵀ where ΔW is one of OUR modules' 0.75·up·down (alpha 1.5 / rank 2,
    # baked by the converter), and every one of our modules is used exactly once
    ours = {
        n.split(".", 1)[0]: 0.75 * sd[n] @ sd[n.replace("lora_up", "lora_down")]
        for n in sd
        if n.endswith(".lora_up.weight")
    }
    used: set[str] = set()
    for module in transformer.modules():
        if not hasattr(module, "lora_A") or adapter not in module.lora_A:
            continue
        x = torch.randn(3, module.base_layer.in_features)
        delta = module(x) - module.base_layer(x)
        match = [n for n, w in ours.items() if w.shape == module.base_layer.weight.shape and n not in used
                 and torch.allclose(delta, x @ w.T, rtol=1e-4, atol=1e-4)]  # fmt: skip
        assert len(match) == 1, match
        used.add(match[0])
    assert used == set(ours)
