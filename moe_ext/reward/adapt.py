"""Personalisation of a sparse MoE reward model: a user's weights over the experts from a
few labelled pairs (Hedge or a gradient step on routing logits), pairwise accuracy, and
how well the router recovers known categories (purity, NMI).

Shapes: prompt_emb (n, P), chosen_emb / rejected_emb (n, Dr), user weights (E,).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .model import SparseMoERewardModel, check_pairs


@torch.no_grad()
def average_routing(model: SparseMoERewardModel, prompt_emb: torch.Tensor) -> torch.Tensor:
    """(E,) the model's mean sparse gates over these prompts: the prior a user starts from."""
    gates, _ = model.gates(prompt_emb)
    return gates.mean(0)


def adapt(model: SparseMoERewardModel, prompt_emb: torch.Tensor, chosen_emb: torch.Tensor,
          rejected_emb: torch.Tensor, method: str = "hedge", eta: float = 0.1, passes: int = 1,
          steps: int = 100, lr: float = 0.1, prior: str = "uniform") -> torch.Tensor:
    """A user's weights over the experts (E,) (a probability vector) from their few pairs.

    hedge:    multiplicative weights: u_e <- u_e * exp(-eta * BT loss of expert e on a pair),
              over the pairs `passes` times, renormalised. Hedge tracks the best single
              expert; with a small eta it keeps a mixture.
    gradient: routing logits z (E,) tuned by Adam for `steps` on the BT loss of the reward
              mixed with softmax(z), starting from the prior.
    prior:    "uniform" or "routing" (the model's average routing on these prompts).
    """
    if method not in ("hedge", "gradient"):
        raise ValueError(f"method must be 'hedge' or 'gradient', got {method!r}")
    if prior not in ("uniform", "routing"):
        raise ValueError(f"prior must be 'uniform' or 'routing', got {prior!r}")
    check_pairs(prompt_emb, chosen_emb, rejected_emb)
    if prompt_emb.shape[0] == 0:
        raise ValueError("adapt needs at least one labelled pair")
    E = model.num_experts
    with torch.no_grad():
        margins = model.expert_rewards(chosen_emb) - model.expert_rewards(rejected_emb)  # (n, E)
        start = (torch.full((E,), 1.0 / E) if prior == "uniform"
                 else average_routing(model, prompt_emb).float().clamp_min(1e-3))
        start = start / start.sum()
    if method == "hedge":
        log_u = torch.log(start)
        losses = -F.logsigmoid(margins.float())  # (n, E) each expert's pairwise loss
        for _ in range(passes):
            for i in range(losses.shape[0]):
                log_u = log_u - eta * losses[i]
                log_u = log_u - torch.logsumexp(log_u, 0)
        return log_u.exp()
    z = torch.log(start).clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    for _ in range(steps):
        loss = -F.logsigmoid((margins.float() * torch.softmax(z, 0)).sum(-1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.softmax(z.detach(), 0)


@torch.no_grad()
def pairwise_accuracy(model: nn.Module, prompt_emb: torch.Tensor, chosen_emb: torch.Tensor,
                      rejected_emb: torch.Tensor, user_weights: Optional[torch.Tensor] = None) -> float:
    """Fraction of pairs where the chosen response gets the higher reward."""
    check_pairs(prompt_emb, chosen_emb, rejected_emb)
    rc = model(prompt_emb, chosen_emb, user_weights)
    rr = model(prompt_emb, rejected_emb, user_weights)
    return (rc > rr).float().mean().item()


def purity_nmi(pred: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """Cluster purity (each predicted cluster counted as its majority category) and NMI
    (arithmetic normalisation) of predicted vs true labels (n,): how well the router's top
    expert recovers known categories."""
    n = len(truth)
    table = torch.zeros(int(truth.max()) + 1, int(pred.max()) + 1)
    table.index_put_((truth.long(), pred.long()), torch.ones(n), accumulate=True)
    purity = table.max(0).values.sum().item() / n
    p = table / n
    pt, pp = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    mi = (p[nz] * torch.log(p[nz] / (pt @ pp)[nz])).sum().item()

    def entropy(q):
        q = q[q > 0]
        return -(q * torch.log(q)).sum().item()

    denom = (entropy(pt) + entropy(pp)) / 2
    return purity, (mi / denom if denom > 0 else 1.0)
