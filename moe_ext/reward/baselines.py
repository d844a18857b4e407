"""Ensemble baselines that few-shot adaptation (HyRe, Hedge, gradient) can re-weight like
the experts of a mixture: H reward heads on the response embedding, no router.

  random_heads(universal, H)      the trained universal BT head plus H - 1 random
                                  perturbations of it (the "random heads + HyRe" control)
  HeadEnsemble(Dr, H, anchor_coef) H heads trained together, each on its own Bradley-Terry
                                  loss from its own random start, each pulled toward that
                                  start (anchored ensembles, Pearce et al. 2020, so that the
                                  heads stay apart like samples of a posterior): the
                                  "shared-base ensemble" of HyRe (Lee et al. 2024), the
                                  shared base being the response embedding

Shapes: response_emb (B, Dr), expert rewards (B, H), user_weights (H,) or (B, H).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .model import UniversalRewardModel


class HeadEnsemble(nn.Module):
    """H linear reward heads on (features of) the response embedding.

    reward_h(y) = <W_h, phi(y)> + b_h with phi a frozen feature map (identity unless given).
    W_h starts at init_scale * a random unit vector; training adds anchor_coef * |W_h -
    start_h|^2 to each head's loss. Without user weights the reward is the mean over heads;
    with them, the weighted sum."""

    def __init__(self, response_dim: int, num_heads: int, anchor_coef: float = 0.0,
                 init_scale: float = 1.0, features: Optional[nn.Module] = None, seed: int = 0):
        super().__init__()
        if not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be an int >= 1, got {num_heads!r}")
        if anchor_coef < 0 or init_scale < 0:
            raise ValueError(f"anchor_coef and init_scale must be >= 0, got {anchor_coef}, "
                             f"{init_scale}")
        g = torch.Generator().manual_seed(seed)
        start = torch.randn(num_heads, response_dim, generator=g)
        start = init_scale * start / start.norm(dim=1, keepdim=True)
        self.weight = nn.Parameter(start.clone())
        self.bias = nn.Parameter(torch.zeros(num_heads))
        self.register_buffer("start", start)
        self.anchor_coef = anchor_coef
        self.features = features
        if features is not None:
            for p in features.parameters():
                p.requires_grad_(False)

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def expert_rewards(self, response_emb: torch.Tensor) -> torch.Tensor:
        """(B, H) every head's reward."""
        phi = self.features(response_emb) if self.features is not None else response_emb
        return phi @ self.weight.T + self.bias

    def forward(self, prompt_emb, response_emb: torch.Tensor,
                user_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        rewards = self.expert_rewards(response_emb)
        if user_weights is None:
            return rewards.mean(-1)
        if user_weights.shape[-1] != self.num_experts:
            raise ValueError(f"user_weights must have {self.num_experts} entries per row, got "
                             f"shape {tuple(user_weights.shape)}")
        return (rewards * user_weights.to(rewards.dtype)).sum(-1)

    def ensemble_loss(self, prompt_emb, chosen_emb, rejected_emb):
        """(mean over heads of each head's own BT loss + the anchor term, metrics): the heads
        train independently, so they stay as diverse as their starts and anchors make them."""
        margins = self.expert_rewards(chosen_emb) - self.expert_rewards(rejected_emb)
        bt = -F.logsigmoid(margins).mean()
        anchor = (self.weight - self.start).square().sum(-1).mean()
        return bt + self.anchor_coef * anchor, {"bt": bt.item(), "anchor": anchor.item()}


def random_heads(universal: UniversalRewardModel, num_heads: int = 64, scale: float = 1.0,
                 seed: int = 0) -> HeadEnsemble:
    """The control "random heads + HyRe": head 0 is the trained universal head; heads 1..H-1
    add a random direction of norm scale * |w| to it (on the universal model's last hidden
    layer when it has one). Nothing is trained: all a re-weighting can use is the spread."""
    last = universal.net if isinstance(universal.net, nn.Linear) else universal.net[-1]
    features = None if isinstance(universal.net, nn.Linear) else universal.net[:-1]
    w, b = last.weight.detach()[0], last.bias.detach()[0]
    ensemble = HeadEnsemble(w.shape[0], num_heads, features=features, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(num_heads, w.shape[0], generator=g)
    noise = noise / noise.norm(dim=1, keepdim=True) * scale * w.norm()
    noise[0] = 0.0
    with torch.no_grad():
        ensemble.weight.copy_(w + noise)
        ensemble.bias.fill_(float(b))
    return ensemble.requires_grad_(False)
