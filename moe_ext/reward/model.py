"""Sparse mixture-of-experts reward model for personalised preferences (after arXiv
2606.04284), on moe_ext's routing kernel.

Embedding mode: inputs are prompt and response embeddings from a frozen encoder. A router on
the prompt embedding picks top_k of E experts; each expert is a reward head on the response
embedding; the reward is the router-weighted mix of the chosen experts' rewards:

    r(x, y) = sum_{k<K} w_k(x) * r_{e_k}(y),   w = renormalised top-K of softmax(router(x))

Training (fit.py): Bradley-Terry on binary preference pairs with local sparsity, global
balance and expert diversity. Personalisation (adapt.py): a user's few labelled pairs
re-weight the experts; the user's weights minus the model's average routing is their
interpretable profile.

Shapes: prompt_emb (B, P), response_emb (B, Dr), rewards (B,), routing probs (B, E),
user_weights (E,) or (B, E).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..utils.config import DictConfig, is_int, is_real


@dataclass
class RewardConfig(DictConfig):
    """The shape of a SparseMoERewardModel (saved beside its weights as JSON)."""
    prompt_dim: int                      # P, prompt embedding size (router input)
    response_dim: int                    # Dr, response embedding size (expert input)
    num_experts: int                     # E
    top_k: int = 1                       # K experts per prompt
    expert_hidden: Optional[int] = None  # None: linear expert heads; H: one-hidden-layer MLPs
    router_temperature: float = 1.0
    num_users: int = 0                   # U training users with a learned routing bias each

    def __post_init__(self):
        for name in ("prompt_dim", "response_dim", "num_experts"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int in [1, 2**31 - 1], got {value!r}")
        if not is_int(self.top_k) or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be an int in [1, num_experts={self.num_experts}], "
                             f"got {self.top_k!r}")
        if self.expert_hidden is not None and (not is_int(self.expert_hidden)
                                               or self.expert_hidden < 1):
            raise ValueError(f"expert_hidden must be None or an int in [1, 2**31 - 1], got "
                             f"{self.expert_hidden!r}")
        if not (is_real(self.router_temperature) and self.router_temperature > 0):
            raise ValueError(f"router_temperature must be a finite number > 0, got "
                             f"{self.router_temperature!r}")
        if not is_int(self.num_users) or self.num_users < 0:
            raise ValueError(f"num_users must be an int in [0, 2**31 - 1], got {self.num_users!r}")


class SparseMoERewardModel(nn.Module):
    """Router nn.Linear(prompt_dim, E); experts are linear heads on the response embedding
    (expert_hidden=None) or one-hidden-layer MLPs (expert_hidden=H), all E batched.

    With num_users = U > 0, each training user u also has a learned bias b_u (E,) on the
    routing logits, L = router(x) + b_u, used when user ids are given (training on pairs
    labelled by known users): a user's pairs can then route to the experts of their own
    preference pattern even when it does not show in the prompt. New users get their
    weights from `adapt`."""

    def __init__(self, prompt_dim: int, response_dim: int, num_experts: int, top_k: int = 1,
                 expert_hidden: Optional[int] = None, router_temperature: float = 1.0,
                 num_users: int = 0):
        super().__init__()
        self.config = RewardConfig(prompt_dim, response_dim, num_experts, top_k, expert_hidden,
                                   router_temperature, num_users)
        E = num_experts
        self.router = nn.Linear(prompt_dim, E)
        if num_users:
            self.user_bias = nn.Parameter(torch.zeros(num_users, E))
        if expert_hidden is None:
            self.head_w = nn.Parameter(torch.randn(E, response_dim) / math.sqrt(response_dim))
            self.head_b = nn.Parameter(torch.zeros(E))
        else:
            self.hidden_w = nn.Parameter(torch.randn(E, expert_hidden, response_dim)
                                         / math.sqrt(response_dim))
            self.hidden_b = nn.Parameter(torch.zeros(E, expert_hidden))
            self.head_w = nn.Parameter(torch.randn(E, expert_hidden) / math.sqrt(expert_hidden))
            self.head_b = nn.Parameter(torch.zeros(E))
        with torch.no_grad():
            self.router.weight.normal_(0, 0.02)
            self.router.bias.zero_()

    @classmethod
    def from_config(cls, config: "RewardConfig") -> "SparseMoERewardModel":
        return cls(**config.to_dict())

    # The config's fields, read through the model (model.num_experts, ...).
    prompt_dim = property(lambda self: self.config.prompt_dim)
    response_dim = property(lambda self: self.config.response_dim)
    num_experts = property(lambda self: self.config.num_experts)
    top_k = property(lambda self: self.config.top_k)
    expert_hidden = property(lambda self: self.config.expert_hidden)
    router_temperature = property(lambda self: self.config.router_temperature)
    num_users = property(lambda self: self.config.num_users)

    def _check(self, name: str, t: torch.Tensor, dim: int):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] != dim:
            raise ValueError(f"{name} must have shape (B, {dim}), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")

    def router_logits(self, prompt_emb: torch.Tensor,
                      user_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, E) router(prompt) plus, given user ids (B,), those users' routing biases."""
        self._check("prompt_emb", prompt_emb, self.prompt_dim)
        logits = self.router(prompt_emb)
        if user_ids is None:
            return logits
        if not self.num_users:
            raise ValueError("user_ids given but this model has no per-user routing "
                             "(RewardConfig.num_users = 0)")
        if user_ids.shape != (prompt_emb.shape[0],) or user_ids.dtype.is_floating_point or \
                int(user_ids.min()) < 0 or int(user_ids.max()) >= self.num_users:
            raise ValueError(f"user_ids must be ({prompt_emb.shape[0]},) integers in "
                             f"[0, {self.num_users})")
        return logits + self.user_bias[user_ids]

    def route(self, prompt_emb: torch.Tensor, user_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, E) routing probabilities (softmax over all experts, before top-K; for a
        model with per-user routing and no user_ids, the mean over its training users)."""
        if self.num_users and user_ids is None:
            return self._population_gates(prompt_emb)[1]
        return torch.softmax(self.router_logits(prompt_emb, user_ids).float()
                             / self.router_temperature, -1)

    def expert_rewards(self, response_emb: torch.Tensor) -> torch.Tensor:
        """(B, E): every expert's reward for each response."""
        self._check("response_emb", response_emb, self.response_dim)
        if self.expert_hidden is None:
            return response_emb @ self.head_w.T + self.head_b
        h = torch.einsum("bd,ehd->beh", response_emb, self.hidden_w) + self.hidden_b
        return (F.gelu(h) * self.head_w).sum(-1) + self.head_b

    def gates(self, prompt_emb: torch.Tensor,
              user_ids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(dense gates (B, E): the renormalised top-K weights scattered, zeros elsewhere;
        routing probs (B, E)). Uses moe_ext's routing kernel (top-K with gradient).

        A model with per-user routing and no user_ids given routes like the population of
        its training users: gates and probs are their means over all U users' biases
        (the expected reward of an unknown user from that population)."""
        if self.num_users and user_ids is None:
            return self._population_gates(prompt_emb)
        r = ops.route(self.router_logits(prompt_emb, user_ids), self.top_k, self.router_temperature)
        dense = torch.zeros_like(r.probs).scatter(1, r.experts, r.weights)
        return dense, r.probs

    def _population_gates(self, prompt_emb: torch.Tensor, chunk: int = 1 << 20):
        """Means over the U training users of gates and probs (B, E), in chunks of prompts."""
        B, (U, E) = prompt_emb.shape[0], self.user_bias.shape
        logits = self.router_logits(prompt_emb)
        out_gates, out_probs = [], []
        step = max(1, chunk // (U * E))
        for i in range(0, B, step):
            block = (logits[i:i + step, None, :] + self.user_bias[None]).reshape(-1, E)
            r = ops.route(block, self.top_k, self.router_temperature)
            dense = torch.zeros_like(r.probs).scatter(1, r.experts, r.weights)
            out_gates.append(dense.reshape(-1, U, E).mean(1))
            out_probs.append(r.probs.reshape(-1, U, E).mean(1))
        if not out_gates:
            return logits.new_zeros(0, E).float(), logits.new_zeros(0, E).float()
        return torch.cat(out_gates), torch.cat(out_probs)

    def forward(self, prompt_emb: torch.Tensor, response_emb: torch.Tensor,
                user_weights: Optional[torch.Tensor] = None,
                user_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rewards (B,). With user_weights ((E,) or (B, E), e.g. from `adapt`) those replace
        the router's weights; with user_ids (B,) (training users) the router adds their bias."""
        rewards = self.expert_rewards(response_emb)
        if user_weights is not None:
            u = user_weights.to(rewards.dtype)
            if u.shape[-1] != self.num_experts:
                raise ValueError(f"user_weights must have {self.num_experts} entries per row, "
                                 f"got shape {tuple(u.shape)}")
            return (rewards * u).sum(-1)
        gates, _ = self.gates(prompt_emb, user_ids)
        return (rewards * gates.to(rewards.dtype)).sum(-1)


class UniversalRewardModel(nn.Module):
    """Baseline: one Bradley-Terry reward head on the response embedding, for every user.
    Seen as a mixture it has one expert, so adaptation cannot change it."""

    num_experts = 1

    def __init__(self, response_dim: int, hidden: Optional[int] = None):
        super().__init__()
        self.net = (nn.Linear(response_dim, 1) if hidden is None else
                    nn.Sequential(nn.Linear(response_dim, hidden), nn.GELU(), nn.Linear(hidden, 1)))

    def expert_rewards(self, response_emb: torch.Tensor) -> torch.Tensor:
        """(B, 1): the one head's reward."""
        return self.net(response_emb)

    def forward(self, prompt_emb, response_emb, user_weights=None) -> torch.Tensor:
        return self.net(response_emb).squeeze(-1)


def check_pairs(prompt_emb, chosen_emb, rejected_emb) -> None:
    """ValueError unless the three are 2-D with equal row counts and chosen/rejected shapes match."""
    for name, t in (("prompt_emb", prompt_emb), ("chosen_emb", chosen_emb),
                    ("rejected_emb", rejected_emb)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor (B, dim)")
    if not (prompt_emb.shape[0] == chosen_emb.shape[0] == rejected_emb.shape[0]):
        raise ValueError(f"prompt_emb, chosen_emb and rejected_emb must have the same number of "
                         f"rows, got {prompt_emb.shape[0]}, {chosen_emb.shape[0]}, "
                         f"{rejected_emb.shape[0]}")
    if chosen_emb.shape != rejected_emb.shape:
        raise ValueError(f"chosen_emb shape {tuple(chosen_emb.shape)} must equal rejected_emb "
                         f"shape {tuple(rejected_emb.shape)}")
