"""The generation loop on onnxruntime, following transformers' generate for decoder-only
models: greedy or sampling (temperature, then top-k, then top-p, as transformers' logits
warpers), batches with left padding, EOS and max_new_tokens stopping, steering through the
group_bias input or, for a steerable adapter, a preference mix through preference_weights
(steering_inputs, shared with GenaiCausalLM and the serve engine). `OrtCausalLM.generate`
is the entry point; the step function it drives is `OrtCausalLM.__call__` (one forward
with the KV cache kept on the device)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch

from moe_ext.molora.model import mix_rows


class GenerateOutput(NamedTuple):
    sequences: object                 # (B, S + new) int64, numpy or torch like the input
    logits: Optional[tuple]           # per new token, the raw (B, V) float32 logits


def steering_bias(groups: list[str], steer) -> Optional[np.ndarray]:
    """group_bias (1 or B, G) float32 from steer: None, {group: bias}, or a list of such dicts
    (one per batch row, None or {} for no steering); G follows `groups`. ValueError names an
    unknown group."""
    if steer is None:
        return None
    if not groups:
        raise ValueError("steer: this model has no expert groups (MoLoRAConfig.expert_groups) to steer")
    rows = _rows(steer, "bias", "steer")
    bias = np.zeros((len(rows), len(groups)), np.float32)
    for i, row in enumerate(rows):
        for name, value in (row or {}).items():
            if name not in groups:
                raise ValueError(f"steer: unknown expert group {name!r}; groups: {groups}")
            bias[i, groups.index(name)] = float(value)
    return bias


def _rows(value, what: str, name: str) -> list:
    """[value] for a dict, the list of dicts (one per batch row) for a list; ValueError naming
    `name` else. None entries stand for rows without steering."""
    rows = [value] if isinstance(value, dict) else list(value) if isinstance(value, (list, tuple)) else None
    if not rows or any(row is not None and not isinstance(row, dict) for row in rows):
        raise ValueError(f"{name} must be a dict {{group: {what}}} or a list of such dicts (one "
                         f"per batch row), got {value!r}")
    return rows


def mix_weights(groups: list[str], steerable: bool, mix, name: str = "mix") -> Optional[np.ndarray]:
    """preference_weights (1 or B, G) float32 from mix: None, {group: weight >= 0} (groups
    left out weigh 0) or a list of such dicts (one per batch row; None for a row the prompt
    alone steers: zeros); each row normalised to sum 1, G following `groups`. ValueError
    naming `name` (moe_ext.molora.mix_tensor's checks and wording: an unknown group, a
    negative, NaN or infinite weight, all weights zero) or for a graph that is not steerable."""
    if mix is None:
        return None
    if not steerable:
        raise ValueError(f"{name}: this graph's routers take no preference mix (its adapter's "
                         f"MoLoRAConfig.steerable is false); steer it with steer {{group: bias}}")
    rows = _rows(mix, "weight", name)
    weights = np.zeros((len(rows), len(groups)), np.float32)
    for i, row in enumerate(rows):
        if row is not None:  # groups: the graph's, sorted (the inputs' order)
            weights[i] = mix_rows(groups, row, name)[0].numpy()
    return weights


def steering_inputs(groups: list[str], steerable: bool, steer, mix,
                    batch: int) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """(group_bias, preference_weights), each (1 or `batch`, G) float32 or None, from steer
    (steering_bias) or mix (mix_weights), not both; ValueError naming the bad argument."""
    if steer is not None and mix is not None:
        raise ValueError("give mix or steer, not both")
    bias, weights = steering_bias(groups, steer), mix_weights(groups, steerable, mix)
    for name, rows in (("steer", bias), ("mix", weights)):
        if rows is not None and rows.shape[0] not in (1, batch):
            raise ValueError(f"{name} lists {rows.shape[0]} rows for a batch of {batch}")
    return bias, weights


def warp_logits(logits: np.ndarray, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0) -> np.ndarray:
    """(B, V) logits -> (B, V) with temperature applied and the tokens outside the top-k and
    the top-p nucleus set to -inf (transformers' TemperatureLogitsWarper, TopKLogitsWarper,
    TopPLogitsWarper in that order; each keeps at least one token)."""
    scores = logits.astype(np.float32, copy=True)
    if temperature != 1.0:
        scores /= np.float32(temperature)
    V = scores.shape[-1]
    if top_k and top_k < V:
        kth = -np.partition(-scores, top_k - 1, axis=-1)[:, top_k - 1:top_k]
        scores[scores < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(scores, axis=-1, kind="stable")            # ascending
        ranked = np.take_along_axis(scores, order, axis=-1)
        probs = np.exp(ranked - ranked[:, -1:])
        cumulative = np.cumsum(probs / probs.sum(-1, keepdims=True), axis=-1)
        remove = cumulative <= (1.0 - top_p)
        remove[:, -1] = False
        drop = np.zeros_like(remove)
        np.put_along_axis(drop, order, remove, axis=-1)
        scores[drop] = -np.inf
    return scores


def sample(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One token per row from softmax(scores) (B, V), -inf never drawn."""
    probs = np.exp(scores.astype(np.float64) - scores.max(-1, keepdims=True))
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random(scores.shape[0])[:, None] * cdf[:, -1:]
    picks = (cdf <= u).sum(-1)
    return np.minimum(picks, scores.shape[-1] - 1).astype(np.int64)


def _check_options(max_new_tokens, do_sample, temperature, top_k, top_p) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: no top-k filter), got {top_k!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def _prompt(input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
    ids = input_ids.detach().cpu().numpy() if isinstance(input_ids, torch.Tensor) else np.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[1] < 1 or ids.dtype.kind not in "iu":
        raise ValueError(f"input_ids must be integer token ids of shape (batch, length >= 1), got "
                         f"{ids.dtype} {ids.shape}")
    if attention_mask is None:
        return ids.astype(np.int64), np.ones(ids.shape, np.int64)
    mask = (attention_mask.detach().cpu().numpy() if isinstance(attention_mask, torch.Tensor)
            else np.asarray(attention_mask))
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {ids.shape}, got {mask.shape}")
    if (mask[:, -1] == 0).any():
        raise ValueError("attention_mask: a row ends in padding; generation needs left padding "
                         "(tokenizer.padding_side = 'left')")
    return ids.astype(np.int64), mask.astype(np.int64)


def generate_steps(model, ids: np.ndarray, mask: np.ndarray, *, max_new_tokens: int,
                   do_sample: bool, temperature: float, top_k: int, top_p: float,
                   seed: Optional[int], eos: list[int], pad: Optional[int], bias,
                   weights=None):
    """Yields (new tokens (B,) int64, their raw logits (B, V)) once per step of the loop
    behind OrtCausalLM.generate, from checked prompt arrays and steering inputs (group_bias
    `bias`, preference_weights `weights`, see steering_inputs); rows that ended get `pad`.
    Streaming servers consume it token by token."""
    rng = np.random.default_rng(seed)
    steering = dict(group_bias=bias, preference_weights=weights)
    step = model(ids, mask, **steering)
    running = np.ones(ids.shape[0], bool)
    for t in range(max_new_tokens):
        logits = step.logits[:, -1, :]
        if do_sample:
            new = sample(warp_logits(logits, temperature, top_k, top_p), rng)
        else:
            new = logits.argmax(-1).astype(np.int64)
        if eos:
            new = np.where(running, new, pad)
            running &= ~np.isin(new, eos)
        yield new, logits
        if not running.any() or t == max_new_tokens - 1:
            return
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
        step = model(new[:, None], mask, past_key_values=step.past_key_values, **steering)


def prepare(model, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k,
            top_p, eos_token_id, pad_token_id, steer, mix=None):
    """Checked (ids, mask, eos list, pad id, group_bias, preference_weights) for
    generate_steps; ValueError naming a bad option or input."""
    _check_options(max_new_tokens, do_sample, temperature, top_k, top_p)
    ids, mask = _prompt(input_ids, attention_mask)
    eos = [] if eos_token_id is None else [int(e) for e in np.atleast_1d(eos_token_id)]
    pad = pad_token_id if pad_token_id is not None else model.pad_token_id
    pad = eos[0] if pad is None and eos else pad
    bias, weights = steering_inputs(model.groups, model.steerable, steer, mix, ids.shape[0])
    return ids, mask, eos, pad, bias, weights


def generate_loop(model, input_ids, attention_mask, *, max_new_tokens: int, do_sample: bool,
                  temperature: float, top_k: int, top_p: float, seed: Optional[int],
                  eos_token_id, pad_token_id: Optional[int], steer, mix, output_logits: bool,
                  return_dict_in_generate: bool):
    """The loop behind OrtCausalLM.generate (see there); `model` is an OrtCausalLM."""
    ids, mask, eos, pad, bias, weights = prepare(model, input_ids, attention_mask, max_new_tokens,
                                                 do_sample, temperature, top_k, top_p,
                                                 eos_token_id, pad_token_id, steer, mix)
    tokens, logits_seen = [], []
    for new, logits in generate_steps(model, ids, mask, max_new_tokens=max_new_tokens,
                                      do_sample=do_sample, temperature=temperature, top_k=top_k,
                                      top_p=top_p, seed=seed, eos=eos, pad=pad, bias=bias,
                                      weights=weights):
        tokens.append(new)
        if output_logits:
            logits_seen.append(logits.copy())
    sequences = np.concatenate([ids, np.stack(tokens, axis=1)], axis=1)
    if isinstance(input_ids, torch.Tensor):
        sequences = torch.from_numpy(sequences)
    if not return_dict_in_generate:
        return sequences
    return GenerateOutput(sequences, tuple(logits_seen) if output_logits else None)
