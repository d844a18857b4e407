"""An offline population of users in the style of PersonalLLM (Zollo et al., 2024), for the
field's evaluation protocol (evaluate.py): no download, every number seeded.

World: prompts p with features z_p (P,) drawn around `topics` centres, each with M candidate
responses with features f (Dr,) ~ N(0, I). K base reward functions score them,

    s_k(p, r) = (1 + prompt_effect * tanh(<c_k, z_p>)) * <a_k, f_r>,

with a_k = unit(shared_quality * q + sqrt(1 - shared_quality^2) * u_k): a shared quality
direction q makes the base rewards agree in part, as real reward models do; c_k makes how
much each counts depend on the prompt. A user is a weight vector w ~ Dirichlet(alpha) over
the K base rewards; on a prompt the user's pair is (argmax, argmin) over the M candidates
of sum_k w_k s_k, as in PersonalLLM.

Users and prompts: the prompts are split into seen (training) and unseen ones. Seen users
each label `seen_user_share` of the seen prompts: that is the training set (Pairs.user
holds each pair's user id, which models with per-user routing train on). Unseen users only bring `adapt_pool` pairs on seen prompts, from which few-shot
adaptation sets are drawn. Every user has `eval_pairs` held-out pairs on seen prompts
(ones they did not label) and as many on unseen prompts.

Shapes: prompt_emb (Np, P), response_emb (Np, M, Dr), base_scores (Np, M, K), user weights
(U, K); a Pairs set holds index tensors (n,) into these.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..utils.config import DictConfig


@dataclass
class PopulationConfig(DictConfig):
    prompts: int = 12500
    unseen_prompt_fraction: float = 0.2
    candidates: int = 8              # M responses per prompt
    base_rewards: int = 10           # K base reward functions
    prompt_dim: int = 16             # P
    response_dim: int = 32           # Dr
    topics: int = 8
    shared_quality: float = 0.5      # cosine between each base reward and the shared direction
    prompt_effect: float = 0.5       # how far a prompt scales each base reward (0: not at all)
    alpha: float = 0.1               # Dirichlet concentration of the users' weights
    seen_users: int = 1000
    unseen_users: int = 500
    seen_user_share: float = 0.005   # share of the seen prompts each seen user labels
    adapt_pool: int = 100            # pairs per unseen user to draw adaptation sets from
    eval_pairs: int = 50             # held-out pairs per user, on seen and on unseen prompts
    seed: int = 0

    def __post_init__(self):
        for name in ("prompts", "candidates", "base_rewards", "prompt_dim", "response_dim",
                     "topics", "seen_users", "unseen_users", "adapt_pool", "eval_pairs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"PopulationConfig.{name} must be an int >= 1, got "
                                 f"{getattr(self, name)!r}")
        if self.candidates < 2:
            raise ValueError(f"PopulationConfig.candidates must be >= 2, got {self.candidates}")
        if self.base_rewards >= self.response_dim:
            raise ValueError(f"PopulationConfig.base_rewards ({self.base_rewards}) must be < "
                             f"response_dim ({self.response_dim})")
        if not 0 < self.unseen_prompt_fraction < 1 or not 0 < self.seen_user_share <= 1:
            raise ValueError("unseen_prompt_fraction must be in (0, 1) and seen_user_share in (0, 1]")
        if not 0 <= self.shared_quality < 1 or self.prompt_effect < 0 or self.alpha <= 0:
            raise ValueError("shared_quality must be in [0, 1), prompt_effect >= 0, alpha > 0")


@dataclass
class Pairs:
    """n labelled pairs as indices: prompt (n,), chosen / rejected candidate (n,), user (n,).
    Sets built per user keep each user's pairs together, users in order."""
    prompt: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor
    user: torch.Tensor

    def __len__(self) -> int:
        return self.prompt.shape[0]


@dataclass
class Population:
    config: PopulationConfig
    prompt_emb: torch.Tensor       # (Np, P)
    response_emb: torch.Tensor     # (Np, M, Dr)
    base_scores: torch.Tensor      # (Np, M, K)
    base_directions: torch.Tensor  # (K, Dr) a_k
    seen_prompts: torch.Tensor     # (Ns,) prompt ids
    unseen_prompts: torch.Tensor   # (Nu,)
    seen_weights: torch.Tensor     # (Us, K) seen users' weights over the base rewards
    unseen_weights: torch.Tensor   # (Uu, K)
    train: Pairs                   # seen users on seen prompts, per_user pairs each
    seen_eval: dict                # "seen_prompts" / "unseen_prompts" -> Pairs, eval_pairs per user
    unseen_adapt: Pairs            # adapt_pool pairs per unseen user, on seen prompts
    unseen_eval: dict

    @property
    def per_user(self) -> int:
        """Training pairs per seen user."""
        return len(self.train) // self.seen_weights.shape[0]

    def embeddings(self, pairs: Pairs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prompt (n, P), chosen (n, Dr), rejected (n, Dr)) embeddings of the pairs."""
        return (self.prompt_emb[pairs.prompt], self.response_emb[pairs.prompt, pairs.chosen],
                self.response_emb[pairs.prompt, pairs.rejected])

    def base_margins(self, pairs: Pairs) -> torch.Tensor:
        """(n, K) each base reward's score of chosen minus rejected."""
        s = self.base_scores[pairs.prompt]
        return s[torch.arange(len(pairs)), pairs.chosen] - s[torch.arange(len(pairs)), pairs.rejected]


def _label(base_scores, weights, prompts, users) -> Pairs:
    """Each user's (argmax, argmin) candidates of their weighted score on their prompt."""
    scores = (base_scores[prompts] * weights[users].unsqueeze(1)).sum(-1)  # (n, M)
    return Pairs(prompts, scores.argmax(1), scores.argmin(1), users)


def _per_user_prompts(pool: torch.Tensor, users: int, count: int, g: torch.Generator) -> torch.Tensor:
    """(users, count) distinct prompts of `pool` for each user."""
    if count > pool.shape[0]:
        raise ValueError(f"need {count} distinct prompts per user but the pool has {pool.shape[0]}")
    return torch.stack([pool[torch.randperm(pool.shape[0], generator=g)[:count]]
                        for _ in range(users)])


def make_population(config: PopulationConfig = PopulationConfig()) -> Population:
    """The world, the users and their pairs of the module docstring, from config.seed."""
    c = config
    g = torch.Generator().manual_seed(c.seed)
    K, P, Dr, M = c.base_rewards, c.prompt_dim, c.response_dim, c.candidates
    centres = torch.randn(c.topics, P, generator=g) * 2.0
    topic = torch.randint(0, c.topics, (c.prompts,), generator=g)
    prompt_emb = centres[topic] + 0.5 * torch.randn(c.prompts, P, generator=g)
    response_emb = torch.randn(c.prompts, M, Dr, generator=g)
    basis, _ = torch.linalg.qr(torch.randn(Dr, K + 1, generator=g))
    q, u = basis[:, 0], basis[:, 1:].T                                    # (Dr,), (K, Dr)
    directions = c.shared_quality * q + math.sqrt(1 - c.shared_quality ** 2) * u
    prompt_dirs = torch.nn.functional.normalize(torch.randn(K, P, generator=g), dim=1)
    gain = 1 + c.prompt_effect * torch.tanh(prompt_emb @ prompt_dirs.T)   # (Np, K)
    base_scores = (response_emb @ directions.T) * gain.unsqueeze(1)       # (Np, M, K)

    order = torch.randperm(c.prompts, generator=g)
    n_unseen = max(1, int(round(c.prompts * c.unseen_prompt_fraction)))
    unseen_prompts, seen_prompts = order[:n_unseen].sort().values, order[n_unseen:].sort().values
    rng = np.random.default_rng(c.seed)  # torch's Dirichlet has no generator argument
    seen_w, unseen_w = (torch.from_numpy(rng.dirichlet([c.alpha] * K, n)).float()
                        for n in (c.seen_users, c.unseen_users))

    per_user = max(1, int(round(c.seen_user_share * seen_prompts.shape[0])))
    Us, Uu, n_eval = c.seen_users, c.unseen_users, c.eval_pairs
    seen_own = _per_user_prompts(seen_prompts, Us, per_user + n_eval, g)  # train, then eval
    unseen_own = _per_user_prompts(seen_prompts, Uu, c.adapt_pool + n_eval, g)

    def pairs(weights, prompts):  # prompts (U, n) -> the users' pairs, user-major
        U, n = prompts.shape
        return _label(base_scores, weights, prompts.reshape(-1), torch.arange(U).repeat_interleave(n))

    return Population(
        c, prompt_emb, response_emb, base_scores, directions, seen_prompts, unseen_prompts,
        seen_w, unseen_w,
        train=pairs(seen_w, seen_own[:, :per_user]),
        seen_eval={"seen_prompts": pairs(seen_w, seen_own[:, per_user:]),
                   "unseen_prompts": pairs(seen_w, _per_user_prompts(unseen_prompts, Us, n_eval, g))},
        unseen_adapt=pairs(unseen_w, unseen_own[:, :c.adapt_pool]),
        unseen_eval={"seen_prompts": pairs(unseen_w, unseen_own[:, c.adapt_pool:]),
                     "unseen_prompts": pairs(unseen_w, _per_user_prompts(unseen_prompts, Uu, n_eval, g))})
