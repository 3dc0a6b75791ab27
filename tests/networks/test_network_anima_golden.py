"""Golden Anima DiT numbers of spec networks.md §2.2/§3.8 not covered by test_anima_targets.py:
454 candidate leaves before the default excludes (174 excluded), LoKr f8 full and LoKr r16 f4 params.
Built on the meta device from the real config (no weights)."""

from __future__ import annotations

import torch

from library.anima.model import Anima, AnimaConfig
from networks import lokr, lora


def _params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters() if p.ndim > 0)


def test_anima_real_config_excludes_and_lokr_params() -> None:
    with torch.device("meta"):
        dit = Anima(AnimaConfig())
        net = lora.create_network(1.0, 4, 1.0, None, None, dit)
        assert len(net.all_loras) == 280 and len(net.excluded_names) == 454 - 280
        assert "lora_unet_blocks_0_adaln_modulation_self_attn_1" in net.excluded_names
        assert "lora_unet_x_embedder_proj_1" in net.excluded_names
        full = lokr.create_network(1.0, 32, 16.0, None, None, dit, factor=8, full_matrix=True)
        assert _params(full) == 27_543_040
        assert all(m.lokr_layout.both_full and m.scale == 1.0 for m in full.all_loras)
        assert _params(lokr.create_network(1.0, 16, 16.0, None, None, dit, factor=4)) == 5_738_880
