"""Fresh adapters are created and drawn on the CPU whatever device the base model is on, then moved to
the base layer's device: a model loaded straight onto the GPU starts training from the same adapter values
as one still on the CPU (the meta device stands in for the GPU here: it holds no values, so any draw made
there would leave the CPU generator behind)."""

from __future__ import annotations

import copy

import pytest
import torch

from library.anima.model import Anima, tiny_anima_config
from networks import loha, lokr, lora


@pytest.mark.parametrize("module", [lora, loha, lokr], ids=["lora", "loha", "lokr"])
def test_fresh_adapters_draw_on_the_cpu_and_follow_the_base_device(module) -> None:
    torch.manual_seed(0)
    dit = Anima(tiny_anima_config()).requires_grad_(False)
    on_meta = copy.deepcopy(dit).to("meta")
    torch.manual_seed(1)
    net_cpu = module.create_network(1.0, 4, 2.0, None, None, dit)
    after_cpu = torch.rand(8)
    torch.manual_seed(1)
    net_meta = module.create_network(1.0, 4, 2.0, None, None, on_meta)
    after_meta = torch.rand(8)
    assert torch.equal(after_cpu, after_meta)  # the same draws, in the same order, from the CPU generator
    assert net_cpu.state_dict().keys() == net_meta.state_dict().keys()
    assert {t.device.type for t in net_meta.state_dict().values()} == {"meta"}
    assert {t.device.type for t in net_cpu.state_dict().values()} == {"cpu"}
    # starting values are not all zero (ΔW is: one factor starts at zero), so the draws matter
    assert any(t.abs().sum() > 0 for k, t in net_cpu.state_dict().items() if not k.endswith("alpha"))
