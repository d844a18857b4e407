"""Generation from a PMoL (or any MoLoRA) causal LM with PyTorch: the prompt rendered with
the tokenizer's chat template (moe_ext.data.encode_prompt), greedy by default or sampled,
optionally steered for this call only: by a preference mix {group: weight} (`mix`: the
routers of a steerable model take it as their input; any other PMoL model gets the group
biases log(weight), mixing.mix_bias) or by a raw logit bias per expert group (`steer`,
set_group_bias); one prompt (`generate`) or many at once, left-padded (`generate_batch`).

Only GenerationOptions' flags apply: the model's own generation_config (a base model's
repetition_penalty, num_beams, min_new_tokens, ...) is set aside for the call, so the text
is what the exported graph's loop (moe_ext.export.OrtCausalLM.generate) gives."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from ..data import Text, encode_prompts_left_padded
from ..molora import is_steerable, mix_tensor, preference_mix, set_group_bias


@dataclass
class GenerationOptions:
    """Decoding options (the `moe-ext generate` flags); greedy unless do_sample."""
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    chat_template: bool = True        # render the prompt with the tokenizer's template if it has one

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def generate_kwargs(self, tokenizer) -> dict:
        """Keyword arguments for transformers' generate (only the flags that apply)."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                  "pad_token_id": pad, "eos_token_id": tokenizer.eos_token_id}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_k=self.top_k or 0,
                          top_p=self.top_p if self.top_p is not None else 1.0)
        else:  # greedy: neutral sampling flags, so a model's sampling defaults do not warn
            kwargs.update(temperature=None, top_k=None, top_p=None)
        return kwargs


def generate(model: nn.Module, tokenizer, prompt: Text, options: Optional[GenerationOptions] = None,
             steer: Optional[dict[str, float]] = None,
             mix: Optional[dict[str, float]] = None) -> str:
    """The text the model generates after `prompt` (a string or a list of messages).
    steer: {group: logit bias} added to the router logits of that expert group during this
    call (the model's biases are reset afterwards). mix: {group: weight >= 0} (normalised;
    groups left out weigh 0): a steerable model's routers take it as their input, another
    PMoL model is steered by the group biases log(weight / sum) (mixing.mix_bias).
    ValueError naming `mix` for an unknown group, a negative, NaN or all-zero weight."""
    return generate_batch(model, tokenizer, [prompt], options, steer, mix=mix)[0]


def mix_bias(weights: dict[str, float], groups: Sequence[str], strength: float = 1.0,
             floor: float = 1e-3) -> dict[str, float]:
    """Group logit biases for a mix: bias_g = strength * log(max(w_g / sum w, floor)), so at
    strength 1 and router temperature tau = 1 the router's softmax mass on group g is
    multiplied by w_g (by w_g ** (strength / tau) in general: the route op divides the
    biased logits by tau; the null experts keep bias 0); groups missing from `weights` get
    weight 0. ValueError for weights, strength or floor that are not finite."""
    unknown = [g for g in weights if g not in groups]
    if unknown:
        raise ValueError(f"mix names unknown groups {unknown}; groups: {list(groups)}")
    if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights.values()):
        raise ValueError(f"mix weights must be finite numbers, got {weights}")
    if not (math.isfinite(strength) and math.isfinite(floor)):
        raise ValueError(f"strength and floor must be finite, got {strength}, {floor}")
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"mix weights must be >= 0 with a positive sum, got {weights}")
    if strength <= 0 or not 0 < floor < 1:
        raise ValueError(f"need strength > 0 and floor in (0, 1), got {strength}, {floor}")
    total = sum(weights.values())
    return {g: strength * math.log(max(weights.get(g, 0.0) / total, floor)) for g in groups}


def _mix_steering(model: nn.Module, mix, steer):
    """(context-manager factory, group biases) that apply `mix` (see generate) for a call."""
    if mix is None:
        return contextlib.nullcontext, steer
    if steer:
        raise ValueError("give mix or steer, not both")
    lam = mix_tensor(model, mix, "mix")  # checks the mix for any model
    if is_steerable(model):
        return lambda: preference_mix(model, lam, "mix"), None
    groups = list(model.molora_config.expert_groups)
    return contextlib.nullcontext, mix_bias(dict(zip(groups, lam[0].tolist())), groups)


@contextlib.contextmanager
def _only_given_flags(model: nn.Module):
    """transformers fills every flag a call leaves unset from model.generation_config; a
    blank GenerationConfig there for the call leaves only the flags given."""
    saved = getattr(model, "generation_config", None)
    if saved is None:
        yield
        return
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


@torch.no_grad()
def generate_batch(model: nn.Module, tokenizer, prompts: Sequence[Text],
                   options: Optional[GenerationOptions] = None,
                   steer: Optional[dict[str, float]] = None, batch_size: int = 64,
                   mix: Optional[dict[str, float]] = None) -> list[str]:
    """generate() for many prompts, batch_size at a time, left-padded (the pad positions
    are masked, so under greedy decoding each text equals the prompt's own generate()).
    options.seed seeds sampling once for the whole call; mix and steer as in generate()."""
    options = options or GenerationOptions()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    mixing, steer = _mix_steering(model, mix, steer)
    device = next(model.parameters()).device
    if options.seed is not None:
        torch.manual_seed(options.seed)
    was_training = model.training
    model.eval()
    steerable = steer or getattr(model, "molora_config", None) is not None  # else a plain LM
    if steerable:
        set_group_bias(model, steer or None)
    texts = []
    try:
        for i in range(0, len(prompts), batch_size):
            ids, mask = encode_prompts_left_padded(tokenizer, list(prompts[i:i + batch_size]),
                                                   options.chat_template)
            with _only_given_flags(model), mixing():
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     **options.generate_kwargs(tokenizer))
            texts += [t.strip() for t in tokenizer.batch_decode(out[:, ids.shape[1]:],
                                                                skip_special_tokens=True)]
    finally:
        if steerable:
            set_group_bias(model, None)
        model.train(was_training)
    return texts
