"""Training a sparse MoE reward model (or the universal baseline) on preference pairs:
Bradley-Terry with local sparsity (low routing entropy per sample), global balance (even
expert use over the data) and expert diversity (experts' margins not redundant), on the
shared training loop.

Shapes: prompt_emb (n, P), chosen_emb / rejected_emb (n, Dr).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..training import TrainConfig, train
from ..utils.config import is_real
from .model import SparseMoERewardModel, check_pairs


@dataclass
class FitConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-2
    weight_decay: float = 0.0    # AdamW's decoupled weight decay
    objective: str = "mixture"   # "mixture": mixture of per-expert BT likelihoods;
                                 # "mixed_reward": BT on the mixed reward
    sparsity_coef: float = 0.05  # mean routing entropy per sample (low = confident routing)
    balance_coef: float = 0.1    # log E - entropy of the mean routing (even use overall)
    diversity_coef: float = 0.05 # squared correlation between experts' margins
    dense_router_grad: bool = False  # the loss's gradient reaches the router through all E
                                     # probabilities (top-1 gates alone pass none)
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.objective not in ("mixture", "mixed_reward"):
            raise ValueError(f"FitConfig.objective must be 'mixture' or 'mixed_reward', "
                             f"got {self.objective!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"FitConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("sparsity_coef", "balance_coef", "diversity_coef", "weight_decay"):
            if not (is_real(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"FitConfig.{name} must be a finite number >= 0, got "
                                 f"{getattr(self, name)}")
        if not (is_real(self.lr) and self.lr > 0):
            raise ValueError(f"FitConfig.lr must be a finite number > 0, got {self.lr}")


def moe_loss(model: SparseMoERewardModel, prompt, chosen, rejected, cfg: FitConfig,
             user_ids: Optional[torch.Tensor] = None):
    """(total loss, metrics) for one batch of pairs (user_ids (B,): their labellers, for a
    model with per-user routing)."""
    margins = model.expert_rewards(chosen) - model.expert_rewards(rejected)  # (B, E)
    gates, probs = model.gates(prompt, user_ids)
    if cfg.dense_router_grad:  # straight-through: sparse gates forward, dense probs backward
        gates = gates + probs - probs.detach()
    if cfg.objective == "mixture":
        bt = -torch.log((gates * torch.sigmoid(margins)).sum(-1).clamp_min(1e-9)).mean()
    else:
        bt = -F.logsigmoid((gates * margins).sum(-1)).mean()
    E = probs.shape[1]
    entropy = -(probs * torch.log(probs.clamp_min(1e-9))).sum(-1).mean()
    mean_p = probs.mean(0)
    balance = math.log(E) + (mean_p * torch.log(mean_p.clamp_min(1e-9))).sum()
    diversity = margins.new_zeros(())
    if E > 1 and margins.shape[0] > 1:
        m = margins - margins.mean(0)
        m = m / m.norm(dim=0).clamp_min(1e-6)
        corr = m.T @ m
        diversity = (corr - torch.diag(torch.diag(corr))).square().sum() / (E * (E - 1))
    total = (bt + cfg.sparsity_coef * entropy + cfg.balance_coef * balance
             + cfg.diversity_coef * diversity)
    return total, {"bt": bt.item(), "entropy": entropy.item(), "balance": balance.item(),
                   "diversity": diversity.item()}


def fit(model: nn.Module, prompt_emb: torch.Tensor, chosen_emb: torch.Tensor,
        rejected_emb: torch.Tensor, config: Optional[FitConfig] = None,
        user_ids: Optional[torch.Tensor] = None, **options) -> list[dict]:
    """Trains `model` (SparseMoERewardModel, UniversalRewardModel or HeadEnsemble) on pairs
    (prompt_emb (n, P), chosen_emb and rejected_emb (n, Dr)) for cfg.epochs passes over
    shuffled mini-batches, on the shared training loop (moe_ext.training); options override
    FitConfig fields. user_ids (n,): who labelled each pair, for a SparseMoERewardModel with
    num_users > 0 (other models ignore them). Returns one metrics row per epoch (the mean
    over its batches)."""
    cfg = config or FitConfig()
    if options:
        cfg = FitConfig(**{**cfg.__dict__, **options})
    check_pairs(prompt_emb, chosen_emb, rejected_emb)
    n = prompt_emb.shape[0]
    if n == 0:
        raise ValueError("fit needs at least one preference pair")
    if user_ids is not None and (not isinstance(user_ids, torch.Tensor) or user_ids.shape != (n,)):
        raise ValueError(f"user_ids must be a tensor of shape ({n},)")
    per_epoch = -(-n // cfg.batch_size)
    orders: dict[int, torch.Tensor] = {}

    def batch_fn(step, micro, rank, world):
        epoch, i = divmod(step, per_epoch)
        if epoch not in orders:  # one shuffle per epoch, seeded by (seed, epoch)
            orders.clear()
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
            orders[epoch] = torch.randperm(n, generator=gen)
        idx = orders[epoch][i * cfg.batch_size:(i + 1) * cfg.batch_size]
        users = None if user_ids is None else user_ids[idx]
        return prompt_emb[idx], chosen_emb[idx], rejected_emb[idx], users

    def loss_fn(wrapped, raw, batch):
        p, c, r, users = batch
        if isinstance(raw, SparseMoERewardModel):
            return moe_loss(raw, p, c, r, cfg, users if raw.num_users else None)
        if hasattr(raw, "ensemble_loss"):  # heads trained on their own losses (baselines.py)
            return raw.ensemble_loss(p, c, r)
        loss = -F.logsigmoid(wrapped(p, c) - wrapped(p, r)).mean()
        return loss, {"bt": loss.item()}

    steps = train(model, batch_fn, loss_fn,
                  TrainConfig(steps=cfg.epochs * per_epoch, lr=cfg.lr, weight_decay=cfg.weight_decay,
                              max_grad_norm=0.0, seed=cfg.seed, progress=cfg.progress, amp="none"),
                  describe="fit").history
    history = []
    for epoch in range(cfg.epochs):
        rows = steps[epoch * per_epoch:(epoch + 1) * per_epoch]
        keys = [k for k in rows[0] if k != "step"]
        history.append({"epoch": epoch + 1, **{k: sum(r[k] for r in rows) / len(rows) for k in keys}})
    return history
