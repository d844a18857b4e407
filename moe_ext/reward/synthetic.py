"""Synthetic personalised-preference data with known latent criteria, for the sparse MoE
reward model (embedding mode).

Criteria are C unit directions in response-embedding space; a response's score under
criterion j is <criterion_j, response>. Category data: each of C prompt categories (a
cluster in prompt space) judges pairs by its own criterion. Users judge by a sparse mix of
criteria (their true profile). Labels follow Bradley-Terry with temperature `noise`.
The same world in text, for backbone mode: `text_category_rows`. The PersonalLLM-style
population is in population.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..pmol.synthetic import SYNTHETIC_PREFERENCES, synthetic_preference_data


@dataclass
class PersonalizedTask:
    criteria: torch.Tensor          # (C, Dr) unit vectors
    category_centers: torch.Tensor  # (C, P) prompt cluster of category c, judged by criterion c
    noise: float                    # Bradley-Terry temperature of the labels

    @property
    def num_criteria(self) -> int:
        return self.criteria.shape[0]


@dataclass
class Pairs:
    prompt: torch.Tensor    # (n, P)
    chosen: torch.Tensor    # (n, Dr)
    rejected: torch.Tensor  # (n, Dr)
    label: torch.Tensor     # (n,) category (category data) or user id (user data)

    def __len__(self) -> int:
        return self.prompt.shape[0]

    def take(self, idx) -> "Pairs":
        return Pairs(self.prompt[idx], self.chosen[idx], self.rejected[idx], self.label[idx])


def make_task(num_criteria: int = 6, prompt_dim: int = 16, response_dim: int = 32,
              noise: float = 0.1, seed: int = 0) -> PersonalizedTask:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(response_dim, num_criteria, generator=g))
    centers = torch.randn(num_criteria, prompt_dim, generator=g) * 2.0
    return PersonalizedTask(q.T.contiguous(), centers, noise)


def _label(task, a, b, scores_a, scores_b, g):
    """Bradley-Terry sample: a wins with probability sigmoid((s_a - s_b) / noise)."""
    a_wins = torch.rand(a.shape[0], generator=g) < torch.sigmoid((scores_a - scores_b) / task.noise)
    chosen = torch.where(a_wins[:, None], a, b)
    rejected = torch.where(a_wins[:, None], b, a)
    return chosen, rejected


def _prompts_and_responses(task: PersonalizedTask, n: int, g: torch.Generator):
    """n prompts from random categories (cat (n,), prompt (n, P)) and two candidate
    responses a, b (n, Dr) each."""
    C, P = task.category_centers.shape
    cat = torch.randint(0, C, (n,), generator=g)
    prompt = task.category_centers[cat] + 0.5 * torch.randn(n, P, generator=g)
    Dr = task.criteria.shape[1]
    return cat, prompt, torch.randn(n, Dr, generator=g), torch.randn(n, Dr, generator=g)


def category_pairs(task: PersonalizedTask, n: int, seed: int = 0) -> Pairs:
    """n pairs; each prompt from a random category, judged by that category's criterion."""
    g = torch.Generator().manual_seed(seed)
    cat, prompt, a, b = _prompts_and_responses(task, n, g)
    crit = task.criteria[cat]
    chosen, rejected = _label(task, a, b, (a * crit).sum(-1), (b * crit).sum(-1), g)
    return Pairs(prompt, chosen, rejected, cat)


def sample_users(task: PersonalizedTask, n_users: int, criteria_per_user: int = 2,
                 seed: int = 0) -> torch.Tensor:
    """(n_users, C) sparse non-negative profiles summing to 1 (Dirichlet on a random subset)."""
    g = torch.Generator().manual_seed(seed)
    C = task.num_criteria
    profiles = torch.zeros(n_users, C)
    for u in range(n_users):
        subset = torch.randperm(C, generator=g)[:criteria_per_user]
        w = torch.rand(criteria_per_user, generator=g) + 0.5  # no weight near zero
        profiles[u, subset] = w / w.sum()
    return profiles


def user_pairs(task: PersonalizedTask, profile: torch.Tensor, n: int, seed: int = 0,
               user_id: int = 0) -> Pairs:
    """n pairs judged by a user with this profile (C,); prompts from random categories."""
    g = torch.Generator().manual_seed(seed)
    _, prompt, a, b = _prompts_and_responses(task, n, g)
    direction = profile @ task.criteria  # (Dr,)
    chosen, rejected = _label(task, a, b, a @ direction, b @ direction, g)
    return Pairs(prompt, chosen, rejected, torch.full((n,), user_id))


def oracle_accuracy(task: PersonalizedTask, profile: torch.Tensor, pairs: Pairs) -> float:
    """Accuracy of the noise-free true score (knows the criteria and the profile)."""
    direction = profile @ task.criteria
    return ((pairs.chosen @ direction) > (pairs.rejected @ direction)).float().mean().item()


def text_category_rows(n_per_category: int, seed: int = 0) -> list[dict]:
    """Text pairs for backbone mode: PMoL's three conflicting preferences (concise, verbose,
    safe; each prompt carries a marker word of its preference) as rows with string prompt,
    chosen, rejected and an integer category (the preference's index)."""
    names = list(SYNTHETIC_PREFERENCES)
    return [{"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected,
             "category": names.index(e.preference)}
            for e in synthetic_preference_data(n_per_category, seed=seed)]
