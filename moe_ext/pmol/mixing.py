"""Evaluating preference mixing on generations: a steered model (PMoL group biases) or a
weight-interpolated soup of per-preference LoRAs (Rewarded Soups) is swept over mixes of
two preferences; each mix's sampled replies are scored per preference (moe_ext.pmol.
scorers) and the sweep is summarised by its Pareto front, hypervolume and how far steering
moved each score. Notation: G groups, a mix w = {group: weight >= 0}."""
from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence

import torch
from torch import nn

from ..data import PreferenceExample
from .generate import GenerationOptions, generate_batch, mix_bias  # noqa: F401 (pmol.mix_bias)
from .pareto import hypervolume, pareto_front
from .scorers import score_replies


def pair_mixes(a: str, b: str, points: int) -> list[dict[str, float]]:
    """`points` mixes from all-a to all-b: {a: 1 - t, b: t}, t = 0 .. 1."""
    if points < 2:
        raise ValueError(f"a sweep needs at least 2 points, got {points}")
    return [{a: 1 - i / (points - 1), b: i / (points - 1)} for i in range(points)]


def _scored(model, tokenizer, prompts, options, steer, pair, mix=None) -> dict:
    replies = generate_batch(model, tokenizer, prompts, options, steer, mix=mix)
    return {"scores": score_replies(prompts, replies, pair), "example": replies[0]}


def steering_sweep(model: nn.Module, tokenizer, prompts: Sequence[str], pair: tuple[str, str],
                   points: int = 5, options: Optional[GenerationOptions] = None,
                   strength: float = 1.0) -> list[dict]:
    """Per mix of `pair` (pair_mixes): the replies to `prompts` generated with the mix's
    group biases (mix_bias over the model's groups), scored for both preferences.
    -> [{"weights", "scores": {a, b}, "example": first reply}]."""
    groups = list(model.molora_config.expert_groups)
    return [{"weights": mix, **_scored(model, tokenizer, prompts, options,
                                      mix_bias(mix, groups, strength), pair)}
            for mix in pair_mixes(*pair, points)]


def mix_sweep(model: nn.Module, tokenizer, prompts: Sequence[str], pair: tuple[str, str],
              points: int = 5, options: Optional[GenerationOptions] = None) -> list[dict]:
    """steering_sweep for a steerable model (MoLoRAConfig.steerable): per mix of `pair`
    (pair_mixes; the other groups at weight 0) the routers take the mix as their input
    (generate_batch(mix=...)). Same rows as steering_sweep."""
    return [{"weights": mix, **_scored(model, tokenizer, prompts, options, None, pair, mix)}
            for mix in pair_mixes(*pair, points)]


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's trainable parameters (its adapter)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_interpolated(model: nn.Module, states: Sequence[dict], weights: Sequence[float]) -> None:
    """Sets the model's adapter to sum_i weights[i] * states[i] (adapter_state dicts of models
    with the same adapter layout): the weight interpolation of Rewarded Soups."""
    if len(states) != len(weights) or not states:
        raise ValueError(f"need one weight per state, got {len(weights)} for {len(states)}")
    params = dict(model.named_parameters())
    for name in states[0]:
        params[name].copy_(sum(w * s[name] for w, s in zip(weights, states)))


def soup_sweep(model: nn.Module, states: dict[str, dict], tokenizer, prompts: Sequence[str],
               pair: tuple[str, str], points: int = 5,
               options: Optional[GenerationOptions] = None) -> list[dict]:
    """steering_sweep for Rewarded Soups: per mix, the model's adapter is the mix's
    interpolation of the per-preference adapters states[a] and states[b] (left in place
    of the last mix afterwards)."""
    rows = []
    for mix in pair_mixes(*pair, points):
        load_interpolated(model, [states[p] for p in pair], [mix[p] for p in pair])
        rows.append({"weights": mix, **_scored(model, tokenizer, prompts, options, None, pair)})
    return rows


def summarize_sweep(rows: Sequence[dict], pair: tuple[str, str],
                    reference: tuple[float, float] = (0.0, 0.0)) -> dict:
    """The sweep's Pareto front (indices into rows), its hypervolume above `reference`, per
    preference how far steering moved its score (score at the all-p end minus score at the
    other end; rows ordered from all-a to all-b, as pair_mixes gives them) and whether the
    score is monotone along the sweep (a's never rises from one mix to the next, b's never
    falls; a one-point sweep counts as not monotone: nothing was steered)."""
    points = [tuple(r["scores"][p] for p in pair) for r in rows]
    a, b = pair
    steps = list(zip(points, points[1:]))
    return {"front": pareto_front(points), "hypervolume": hypervolume(points, reference),
            "steering_range": {a: points[0][0] - points[-1][0], b: points[-1][1] - points[0][1]},
            "monotone": {a: bool(steps) and all(q[0] <= p[0] for p, q in steps),
                         b: bool(steps) and all(q[1] >= p[1] for p, q in steps)}}


def conditioned_scores(model: nn.Module, tokenizer, examples: Sequence[PreferenceExample],
                       options: Optional[GenerationOptions] = None) -> dict[str, float]:
    """Without steering: per preference p, the mean p-score of the replies to the prompts of
    p's examples (the prompt's marker asks for p)."""
    prompts = defaultdict(list)
    for e in examples:
        if e.preference is None or not isinstance(e.prompt, str):
            raise ValueError("conditioned_scores needs labelled examples with string prompts")
        prompts[str(e.preference)].append(e.prompt)
    return {p: score_replies(qs, generate_batch(model, tokenizer, qs, options), [p])[p]
            for p, qs in sorted(prompts.items())}
