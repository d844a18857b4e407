"""MoLoRAConfig and MoLoRALinear."""
import json

import pytest
import torch
from torch import nn

from moe_ext import MoLoRAConfig, MoLoRALinear, reference


def test_fresh_layer_equals_base():
    base = nn.Linear(12, 9)
    layer = MoLoRALinear(base, MoLoRAConfig(r=4, num_experts=3, top_k=2))
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(layer(x), base(x))
    assert layer.last_routing.probs.shape == (10, 3)
    assert layer.last_routing.experts.shape == (10, 2)
    assert int(layer.last_routing.counts.sum()) == 20


def test_layer_matches_reference_and_trains():
    torch.manual_seed(0)
    cfg = MoLoRAConfig(r=4, lora_alpha=8, num_experts=4, num_null_experts=1, top_k=2)
    layer = MoLoRALinear(nn.Linear(16, 8), cfg).double()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(40, 16, dtype=torch.float64)
    want = layer.base(x) + reference.molora(x, layer.router(x), layer.lora_A, layer.lora_B, 2,
                                            cfg.scaling, 1)
    torch.testing.assert_close(layer(x), want)
    # only LoRA and router train; a few steps lower a regression loss
    for p in layer.base.parameters():
        p.requires_grad_(False)
    target = torch.randn(40, 8, dtype=torch.float64)
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = (layer(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_logit_bias_steers_routing():
    layer = MoLoRALinear(nn.Linear(6, 6), MoLoRAConfig(r=2, num_experts=3, top_k=1))
    layer.logit_bias[1] = 100.0
    layer(torch.randn(30, 6))
    assert (layer.last_routing.experts == 1).all()


@pytest.mark.parametrize("field,value", [("r", 0), ("num_experts", 0), ("top_k", 5),
                                         ("lora_dropout", 1.0), ("router_temperature", 0.0),
                                         ("strategy", "fast"), ("num_null_experts", -1)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        MoLoRAConfig(**{"num_experts": 4, field: value})


def test_config_expert_groups_checked_and_json_round_trip():
    with pytest.raises(ValueError, match="expert_groups"):
        MoLoRAConfig(num_experts=2, expert_groups={"helpful": [0, 5]})
    cfg = MoLoRAConfig(num_experts=4, num_null_experts=1, expert_groups={"a": [0, 1], "b": [2, 3]})
    again = MoLoRAConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ValueError, match="unknown"):
        MoLoRAConfig.from_dict({"rank": 3})


def test_layer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="base must be"):
        MoLoRALinear(nn.Conv1d(3, 3, 1), MoLoRAConfig())
    with pytest.raises(ValueError, match="config"):
        MoLoRALinear(nn.Linear(3, 3), {"r": 2})
