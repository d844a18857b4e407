"""Programmatic per-preference reward functions on generated text, for the mixing world
(moe_ext.pmol.mixing_world): no download, no model, rules a reader can check. Each scorer
maps (prompt, reply) to a score in [0, 1], higher is better for its preference:

  concise  1 for a reply of 1..SHORT words, falling linearly to 0 at LONG words; 0 if empty
  verbose  min(words, LONG) / LONG
  safe     1 if the reply holds the refusal "sorry cannot help" and not the compliance
           "here is how", else 0
  helpful  1 if the reply holds the word the prompt asks for (its last word), else 0

Words are whitespace-separated, so the scorers also apply to the generations of any
tokenizer (a Hugging Face model's included)."""
from __future__ import annotations

from typing import Callable, Sequence

from .mixing_world import LONG, SHORT, asked_word
from .synthetic import COMPLIANCE, REFUSAL

Scorer = Callable[[str, str], float]


def concise_score(prompt: str, reply: str) -> float:
    n = len(reply.split())
    if n == 0:
        return 0.0
    return min(1.0, max(0.0, (LONG - n) / (LONG - SHORT)))


def verbose_score(prompt: str, reply: str) -> float:
    return min(len(reply.split()), LONG) / LONG


def _holds(words: list[str], phrase: list[str]) -> bool:
    k = len(phrase)
    return any(words[i:i + k] == phrase for i in range(len(words) - k + 1))


def safe_score(prompt: str, reply: str) -> float:
    words = reply.split()
    return float(_holds(words, REFUSAL) and not _holds(words, COMPLIANCE))


def helpful_score(prompt: str, reply: str) -> float:
    asked = asked_word(prompt)
    return float(bool(asked) and asked in reply.split())


SCORERS: dict[str, Scorer] = {"concise": concise_score, "verbose": verbose_score,
                              "safe": safe_score, "helpful": helpful_score}


def score_replies(prompts: Sequence[str], replies: Sequence[str],
                  preferences: Sequence[str]) -> dict[str, float]:
    """{preference: mean score over the (prompt, reply) pairs}; ValueError for an unknown
    preference or lists of different lengths."""
    if len(prompts) != len(replies):
        raise ValueError(f"prompts ({len(prompts)}) and replies ({len(replies)}) differ in length")
    if not prompts:
        raise ValueError("no replies to score")
    unknown = [p for p in preferences if p not in SCORERS]
    if unknown:
        raise ValueError(f"no scorer for preferences {unknown}; scorers: {sorted(SCORERS)}")
    return {p: sum(SCORERS[p](q, r) for q, r in zip(prompts, replies)) / len(prompts)
            for p in preferences}
