"""The evaluation protocol of personalised reward modelling (as in MiCRo, LoRe, PAL, HyRe
and the sparse MoE reward model paper), on a population from population.py:

- pairwise accuracy of seen and unseen users crossed with seen and unseen prompts,
  macro-averaged per user (every user counts once, whatever their number of pairs);
- few-shot curves: for n in `shots`, `resamples` adaptation sets of n pairs drawn per user
  (seen users from their training pairs, unseen users from their adaptation pool), the
  user's weights from each set by each adaptation method, accuracy mean and std over the
  resamples (each resample's accuracy being the macro-average over users);
- global accuracy: the model as trained, no user information, on the same held-out pairs.

Any model with expert_rewards(response_emb) (B, E) and forward(prompt, response) works:
SparseMoERewardModel, the ensembles of baselines.py and UniversalRewardModel (E = 1,
nothing to adapt: its few-shot rows repeat its global accuracy).

Shapes: U users, n pairs, E experts, R resamples; margins (U, n, E).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..utils.config import DictConfig
from .adapt import METHODS, adapt_weights, expert_margins
from .population import Pairs, Population

SHOTS = (1, 2, 5, 10, 20, 50)
GROUPS = ("seen", "unseen")                     # users
PROMPTS = ("seen_prompts", "unseen_prompts")


@dataclass
class ProtocolConfig(DictConfig):
    shots: list = field(default_factory=lambda: list(SHOTS))
    resamples: int = 20
    methods: list = field(default_factory=lambda: list(METHODS))
    seen_users: Optional[int] = 200  # seen users evaluated (the first ones; None: all)
    eta: float = 0.1                 # Hedge
    beta: float = 1.0                # HyRe
    steps: int = 100                 # gradient
    lr: float = 0.1                  # gradient
    seed: int = 0

    def __post_init__(self):
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"ProtocolConfig.methods: unknown {bad}; choose from {METHODS}")
        if self.resamples < 1 or not self.shots or min(self.shots) < 1:
            raise ValueError("ProtocolConfig needs resamples >= 1 and shots >= 1")


@torch.no_grad()
def _margins(model: nn.Module, pop: Population, pairs: Pairs, users: int):
    """(expert margins (U, n, E), routed margins (U, n)) of per-user pair sets."""
    p, c, r = pop.embeddings(pairs)
    expert = expert_margins(model, c, r)
    routed = (model(p, c) - model(p, r)).float()
    return expert.reshape(users, -1, expert.shape[-1]), routed.reshape(users, -1)


def _user_sets(pop: Population, group: str, users: int) -> tuple[Pairs, dict]:
    """(the adaptation pool, {prompt kind: held-out pairs}) of the first `users` users."""
    pool = pop.train if group == "seen" else pop.unseen_adapt
    evals = pop.seen_eval if group == "seen" else pop.unseen_eval

    def first(pairs: Pairs) -> Pairs:
        per = len(pairs) // (pop.seen_weights if group == "seen" else pop.unseen_weights).shape[0]
        k = users * per
        return Pairs(pairs.prompt[:k], pairs.chosen[:k], pairs.rejected[:k], pairs.user[:k])

    return first(pool), {kind: first(evals[kind]) for kind in PROMPTS}


def sample_sets(pool_size: int, users: int, n: int, resamples: int, seed: int) -> torch.Tensor:
    """(R, U, n) indices into each user's pool: R draws of n distinct pairs per user."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(resamples, users, pool_size, generator=g).argsort(-1)[..., :n]


def adapted_weights(pool_margins: torch.Tensor, n: int, method: str, protocol: ProtocolConfig,
                    seed: int) -> torch.Tensor:
    """(R, U, E) each user's weights from each of R resampled sets of n pool pairs."""
    U, size, E = pool_margins.shape
    idx = sample_sets(size, U, n, protocol.resamples, seed)
    sets = pool_margins[torch.arange(U)[None, :, None], idx]          # (R, U, n, E)
    w = adapt_weights(sets.reshape(-1, n, E), method, eta=protocol.eta, beta=protocol.beta,
                      steps=protocol.steps, lr=protocol.lr)
    return w.reshape(protocol.resamples, U, E)


def _accuracy(eval_margins: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(R,) macro-averaged accuracy of weights (R, U, E) on eval margins (U, n, E)."""
    per_user = (torch.einsum("une,rue->run", eval_margins, weights) > 0).float().mean(-1)
    return per_user.mean(-1)


def evaluate_population(model: nn.Module, pop: Population,
                        protocol: Optional[ProtocolConfig] = None) -> dict:
    """The protocol of the module docstring. Returns
    {"global": {prompt kind: acc} over all evaluated users,
     "no_adaptation": {"<users>/<prompt kind>": acc},
     "adapted": {method: {"<users>/<prompt kind>": {n: {"mean", "std"}}}},
     "users": {"seen": Us, "unseen": Uu}}; n larger than a group's pool is left out."""
    protocol = protocol or ProtocolConfig()
    model.eval()
    counts = {"seen": min(protocol.seen_users or pop.seen_weights.shape[0],
                          pop.seen_weights.shape[0]),
              "unseen": pop.unseen_weights.shape[0]}
    result = {"global": {}, "no_adaptation": {}, "adapted": {m: {} for m in protocol.methods},
              "users": counts}
    routed_all = {kind: [] for kind in PROMPTS}
    for gi, group in enumerate(GROUPS):
        U = counts[group]
        pool, evals = _user_sets(pop, group, U)
        pool_margins, _ = _margins(model, pop, pool, U)
        held = {kind: _margins(model, pop, pairs, U) for kind, pairs in evals.items()}
        for kind, (_, routed) in held.items():
            per_user = (routed > 0).float().mean(-1)
            routed_all[kind].append(per_user)
            result["no_adaptation"][f"{group}/{kind}"] = per_user.mean().item()
        for method in protocol.methods:
            for n in protocol.shots:
                if n > pool_margins.shape[1]:
                    continue
                seed = protocol.seed * 1_000_003 + gi * 1009 + n
                if model.num_experts == 1:  # one head: every weight vector is [1]
                    w = torch.ones(protocol.resamples, U, 1)
                else:
                    w = adapted_weights(pool_margins, n, method, protocol, seed)
                for kind, (margins, _) in held.items():
                    acc = _accuracy(margins, w)
                    cell = result["adapted"][method].setdefault(f"{group}/{kind}", {})
                    cell[n] = {"mean": acc.mean().item(), "std": acc.std(unbiased=False).item()}
    for kind in PROMPTS:
        result["global"][kind] = torch.cat(routed_all[kind]).mean().item()
    return result


def unseen_user_weights(model: nn.Module, pop: Population, n: int, method: str,
                        protocol: Optional[ProtocolConfig] = None, users: int = 40) -> torch.Tensor:
    """(users, E) the first unseen users' weights from one adaptation set of n pairs each
    (for plots of how adaptation shifts them)."""
    protocol = protocol or ProtocolConfig()
    one = ProtocolConfig(**{**protocol.to_dict(), "resamples": 1})
    pool, _ = _user_sets(pop, "unseen", users)
    margins, _ = _margins(model, pop, pool, users)
    return adapted_weights(margins, n, method, one, protocol.seed)[0]
