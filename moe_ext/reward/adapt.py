"""Personalisation of a reward model with several experts or heads: a user's weights over
them from a few labelled pairs, pairwise accuracy, and how well the router recovers known
categories (purity, NMI).

Methods (`adapt_weights` works on many adaptation sets at once, `adapt` on one model):
  hedge:    online multiplicative weights: u_e <- u_e * exp(-eta * BT loss of expert e)
            after each pair, `passes` times over the pairs, renormalised. (One pass equals
            a HyRe update with beta = eta: the updates multiply.)
  hyre:     HyRe (Lee et al. 2024): one generalised-Bayes update,
            u = softmax(log prior - beta * sum over the pairs of each expert's BT loss).
  gradient: routing logits z (E,) tuned by Adam for `steps` on the BT loss of the reward
            mixed with softmax(z), starting from the prior.

Works with any model that has expert_rewards(response_emb) -> (B, E) and num_experts:
SparseMoERewardModel, the ensembles of baselines.py, UniversalRewardModel (E = 1), and
BackboneRewardModel, whose pairs may be strings or token batches (see embed_pairs).

Shapes: prompt_emb (n, P), chosen_emb / rejected_emb (n, Dr), margins (S, n, E) for S
adaptation sets, user weights (E,) or (S, E).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import BackboneRewardModel
from .model import SparseMoERewardModel, check_pairs

METHODS = ("hedge", "hyre", "gradient")


def head_inputs(model: nn.Module, prompt, chosen, rejected):
    """(the model that scores embeddings, prompt, chosen, rejected embeddings)."""
    if isinstance(model, BackboneRewardModel):
        return (model.head, *model.embed_pairs(prompt, chosen, rejected))
    check_pairs(prompt, chosen, rejected)
    return model, prompt, chosen, rejected


@torch.no_grad()
def average_routing(model: nn.Module, prompt_emb: torch.Tensor) -> torch.Tensor:
    """(E,) the model's mean sparse gates over these prompts: the prior a user starts from
    (uniform for models without a router). Backbone models take prompt strings too."""
    if isinstance(model, BackboneRewardModel):
        model, prompt_emb = model.head, model.embed(prompt_emb)
    if not isinstance(model, SparseMoERewardModel):
        return torch.full((model.num_experts,), 1.0 / model.num_experts)
    gates, _ = model.gates(prompt_emb)
    return gates.mean(0)


@torch.no_grad()
def expert_margins(model: nn.Module, chosen_emb: torch.Tensor, rejected_emb: torch.Tensor) -> torch.Tensor:
    """(n, E) every expert's reward margin chosen - rejected."""
    return (model.expert_rewards(chosen_emb) - model.expert_rewards(rejected_emb)).float()


def adapt_weights(margins: torch.Tensor, method: str = "hedge", prior: Optional[torch.Tensor] = None,
                  eta: float = 0.1, passes: int = 1, beta: float = 1.0, steps: int = 100,
                  lr: float = 0.1) -> torch.Tensor:
    """User weights (S, E) (probability vectors) from the experts' margins (S, n, E) on S
    adaptation sets of n pairs each ((n, E) gives (E,)); prior (E,) or (S, E), default
    uniform. See the module docstring for the methods."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    single = margins.dim() == 2
    m = margins.float().unsqueeze(0) if single else margins.float()
    if m.dim() != 3 or m.shape[1] == 0:
        raise ValueError(f"margins must have shape (S, n >= 1, E) or (n >= 1, E), got "
                         f"{tuple(margins.shape)}")
    S, n, E = m.shape
    start = torch.full((S, E), 1.0 / E) if prior is None else prior.float().expand(S, E)
    log_prior = torch.log((start / start.sum(-1, keepdim=True)).clamp_min(1e-12))
    losses = -F.logsigmoid(m)                                   # (S, n, E)
    if method == "hedge":
        if passes < 1 or eta <= 0:
            raise ValueError(f"hedge needs passes >= 1 and eta > 0, got {passes}, {eta}")
        log_u = log_prior
        for _ in range(passes):
            for i in range(n):  # online: one multiplicative update per pair, in order
                log_u = torch.log_softmax(log_u - eta * losses[:, i], -1)
        weights = log_u.exp()
    elif method == "hyre":
        if beta <= 0:
            raise ValueError(f"hyre needs beta > 0, got {beta}")
        weights = torch.softmax(log_prior - beta * losses.sum(1), -1)
    else:
        with torch.enable_grad():
            z = log_prior.clone().requires_grad_(True)
            opt = torch.optim.Adam([z], lr=lr)
            for _ in range(steps):
                mixed = (m * torch.softmax(z, -1).unsqueeze(1)).sum(-1)   # (S, n)
                loss = -F.logsigmoid(mixed).mean(1).sum()  # sets are independent
                opt.zero_grad()
                loss.backward()
                opt.step()
        weights = torch.softmax(z.detach(), -1)
    return weights[0] if single else weights


def adapt(model: nn.Module, prompt_emb, chosen_emb, rejected_emb, method: str = "hedge",
          eta: float = 0.1, passes: int = 1, steps: int = 100, lr: float = 0.1,
          prior: str = "uniform", beta: float = 1.0) -> torch.Tensor:
    """A user's weights over the experts (E,) (a probability vector) from their few pairs.

    method: "hedge", "hyre" or "gradient" (see the module docstring).
    prior:  "uniform" or "routing" (the model's average routing on these prompts).
    Backbone models take the pairs as strings or token batches."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if prior not in ("uniform", "routing"):
        raise ValueError(f"prior must be 'uniform' or 'routing', got {prior!r}")
    head, p, c, r = head_inputs(model, prompt_emb, chosen_emb, rejected_emb)
    if p.shape[0] == 0:
        raise ValueError("adapt needs at least one labelled pair")
    start = None if prior == "uniform" else average_routing(head, p).float().clamp_min(1e-3)
    return adapt_weights(expert_margins(head, c, r), method, start, eta=eta, passes=passes,
                         beta=beta, steps=steps, lr=lr)


@torch.no_grad()
def pairwise_accuracy(model: nn.Module, prompt_emb, chosen_emb, rejected_emb,
                      user_weights: Optional[torch.Tensor] = None) -> float:
    """Fraction of pairs where the chosen response gets the higher reward. Backbone models
    take the pairs as strings or token batches."""
    head, p, c, r = head_inputs(model, prompt_emb, chosen_emb, rejected_emb)
    return (head(p, c, user_weights) > head(p, r, user_weights)).float().mean().item()


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
