"""What a mixture's experts do: routing statistics (load, routing entropy, dead experts);
per expert its top-activating prompts and pairs with a short keyword summary; and, on
synthetic data with known base rewards, which expert matches which base reward.

Shapes: prompt_emb (n, P), chosen / rejected (n, Dr), margins (n, E), base margins (n, K).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Optional

import torch
from torch import nn

from .adapt import head_inputs, expert_margins
from .model import SparseMoERewardModel

_WORD = re.compile(r"[a-z][a-z'-]+")


@torch.no_grad()
def routing_stats(model: SparseMoERewardModel, prompt_emb: torch.Tensor,
                  user_ids: Optional[torch.Tensor] = None) -> dict:
    """load: each expert's share of the gate mass (E,); chosen_share: share of prompts that
    route to it (top-K); routing_entropy: mean entropy of the router's probabilities (nats;
    max_entropy = log E); dead_experts: experts no prompt routes to. prompt_emb (B, d);
    user_ids (B,) routes each prompt with its user's bias (per-user routing models; without
    them such a model routes like the mean of its users, see SparseMoERewardModel.gates)."""
    gates, probs = model.gates(prompt_emb, user_ids)
    chosen = (gates > 0).float().mean(0)
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1).mean()
    return {"load": gates.mean(0).tolist(), "chosen_share": chosen.tolist(),
            "routing_entropy": entropy.item(), "max_entropy": math.log(model.num_experts),
            "dead_experts": [e for e in range(model.num_experts) if chosen[e] == 0]}


def base_reward_match(margins: torch.Tensor, base_margins: torch.Tensor) -> dict:
    """Pearson correlation (E, K) between each expert's and each true base reward's margins
    over the same pairs; for each base reward its best expert, for each expert its best base
    reward, and the mean over base rewards of the best correlation (1.0: every base reward
    has an expert that ranks pairs exactly like it)."""
    def unit(x):
        x = x.double() - x.double().mean(0)
        return x / x.norm(dim=0).clamp_min(1e-12)

    corr = (unit(margins).T @ unit(base_margins)).float()            # (E, K)
    best_expert = corr.argmax(0)
    return {"correlation": corr.tolist(),
            "base_to_expert": best_expert.tolist(),
            "expert_to_base": corr.argmax(1).tolist(),
            "best_correlation_per_base": corr.max(0).values.tolist(),
            "mean_best_correlation": corr.max(0).values.mean().item()}


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def keywords(texts: list[str], others: list[str], top: int = 5) -> list[str]:
    """The words most over-represented in `texts` against `others` (smoothed log odds of
    the share of texts that contain the word), most distinctive first."""
    a, b = Counter(), Counter()
    for t in texts:
        a.update(_words(t))
    for t in others:
        b.update(_words(t))
    na, nb = max(len(texts), 1), max(len(others), 1)
    score = {w: math.log((a[w] + 0.5) / (na + 1)) - math.log((b[w] + 0.5) / (nb + 1)) for w in a}
    return [w for w, s in sorted(score.items(), key=lambda kv: (-kv[1], kv[0]))[:top] if s > 0]


@torch.no_grad()
def expert_summaries(model: nn.Module, prompts: list[str], chosen: list[str], rejected: list[str],
                     embeddings: Optional[tuple] = None, top: int = 3, words: int = 5) -> list[dict]:
    """Per expert: its load, the `top` prompts that route to it most strongly, the keywords
    of the prompts it is the top expert for (against the rest), the `top` pairs it ranks
    most differently from the average expert, and the keywords of what it prefers (words of
    chosen over rejected responses in the pairs where its margin most exceeds the others').

    model: a SparseMoERewardModel with `embeddings` = (prompt, chosen, rejected) embeddings
    of the same pairs, or a BackboneRewardModel (embeddings computed from the text)."""
    n = len(prompts)
    if not n == len(chosen) == len(rejected) or n == 0:
        raise ValueError(f"need equally many (>= 1) prompts, chosen and rejected, got {n}, "
                         f"{len(chosen)}, {len(rejected)}")
    if embeddings is None:
        head, p, c, r = head_inputs(model, prompts, chosen, rejected)
    else:
        head, p, c, r = head_inputs(model, *embeddings)
    if p.shape[0] != n:
        raise ValueError(f"embeddings have {p.shape[0]} rows for {n} pairs")
    probs = head.route(p)
    top_expert = probs.argmax(-1)
    margins = expert_margins(head, c, r)
    relative = margins - margins.mean(-1, keepdim=True)
    stats = routing_stats(head, p)
    k = max(1, n // 5)
    out = []
    for e in range(head.num_experts):
        mine = (top_expert == e).nonzero().flatten().tolist()
        rest = (top_expert != e).nonzero().flatten().tolist()
        strong = probs[:, e].argsort(descending=True)[:top].tolist()
        distinct = relative[:, e].argsort(descending=True)
        liked = distinct[:k].tolist()
        out.append({
            "expert": e, "load": stats["load"][e],
            "top_prompts": [prompts[i] for i in strong],
            "prompt_keywords": keywords([prompts[i] for i in mine], [prompts[i] for i in rest], words),
            "top_pairs": [{"prompt": prompts[i], "chosen": chosen[i], "rejected": rejected[i]}
                          for i in distinct[:top].tolist()],
            "prefers": keywords([chosen[i] for i in liked], [rejected[i] for i in liked], words)})
    return out
