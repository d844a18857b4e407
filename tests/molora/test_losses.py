"""Router losses: load balance, z-loss, expert-group soft loss."""
import math

import pytest
import torch

from moe_ext import MoLoRAConfig
from moe_ext.molora import losses


def test_load_balance_is_one_when_even_and_larger_when_skewed():
    M, T = 4, 8
    probs = torch.full((T, M), 1 / M)
    experts = torch.arange(T).remainder(M)[:, None]
    assert losses.load_balance_loss(probs, experts).item() == pytest.approx(1.0)
    skew = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).repeat(T, 1)
    assert losses.load_balance_loss(skew, torch.zeros(T, 1, dtype=torch.long)).item() > 3.5


def test_load_balance_respects_token_mask_and_has_router_gradient():
    logits = torch.randn(6, 3, requires_grad=True)
    probs = torch.softmax(logits, -1)
    experts = probs.topk(1, -1).indices
    mask = torch.tensor([1, 1, 1, 0, 0, 0])
    masked = losses.load_balance_loss(probs, experts, mask)
    torch.testing.assert_close(masked, losses.load_balance_loss(probs[:3], experts[:3]))
    masked.backward()
    assert logits.grad.abs().sum() > 0 and logits.grad[3:].abs().sum() == 0


def test_z_loss_matches_formula():
    logits = torch.randn(5, 4)
    want = torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(losses.router_z_loss(logits), want)


def test_group_soft_loss_values_and_null_flag():
    cfg = MoLoRAConfig(num_experts=4, num_null_experts=1, expert_groups={"a": [0, 1], "b": [2, 3]})
    masks = losses.group_masks(cfg, ["a", "b"])
    probs = torch.tensor([[0.4, 0.2, 0.1, 0.1, 0.2]])
    got = losses.group_soft_loss(probs, torch.tensor([0]), masks)
    assert got.item() == pytest.approx(-math.log(0.6))
    with_null = losses.group_masks(cfg, ["a", "b"], count_null=True)
    assert losses.group_soft_loss(probs, torch.tensor([1]), with_null).item() == pytest.approx(-math.log(0.4))
    unlabelled = losses.group_soft_loss(probs, torch.tensor([-1]), masks)
    assert unlabelled.item() == 0.0
    with pytest.raises(ValueError, match="unknown preference group"):
        losses.group_masks(cfg, ["c"])


def test_group_loss_training_moves_mass_to_the_group():
    cfg = MoLoRAConfig(num_experts=4, expert_groups={"a": [0, 1], "b": [2, 3]})
    masks = losses.group_masks(cfg, ["a", "b"])
    logits = torch.zeros(10, 4, requires_grad=True)
    pref = torch.tensor([0] * 5 + [1] * 5)
    opt = torch.optim.SGD([logits], lr=10.0)
    for _ in range(50):
        loss = losses.group_soft_loss(torch.softmax(logits, -1), pref, masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
    p = torch.softmax(logits, -1)
    assert (p[:5, :2].sum(-1) > 0.9).all() and (p[5:, 2:].sum(-1) > 0.9).all()
