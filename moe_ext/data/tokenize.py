"""Preference rows -> token ids with any Hugging Face tokenizer (PreTrainedTokenizerBase).

With a chat template (the tokenizer's, when `chat_template` is on) the prompt is rendered
with add_generation_prompt=True and each response as the assistant's turn; a standard
row's prompt string becomes one user message, so training sees what `moe-ext generate`
feeds the model (TRL applies the template to conversational rows only). Without one, the
prompt and prompt + response are tokenised as plain text (the tokenizer's own special
tokens) and the EOS token ends each response. As in TRL, a response starts where the
tokenised prompt and prompt + response first differ.

Truncation: the prompt keeps its last `max_prompt_length` tokens; then each response
keeps its first `max_length - len(prompt)` tokens (the prompt keeps at most
max_length - 1, so every response keeps a token).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from .rows import PreferenceExample, Text


@dataclass(frozen=True)
class EncodedExample:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    preference: Optional[Union[str, int]] = None
    preference_labels: Optional[dict] = None   # {preference: 1, -1 or 0} (rows.py)


def uses_chat_template(tokenizer, example_or_prompt, chat_template: bool = True) -> bool:
    """Whether rows like this one are rendered through the tokenizer's chat template;
    ValueError for a conversational row with a tokenizer that has none."""
    conversational = isinstance(getattr(example_or_prompt, "prompt", example_or_prompt), list)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if conversational and not has_template:
        raise ValueError("conversational rows (lists of messages) need a tokenizer with a chat "
                         f"template; {type(tokenizer).__name__} has none")
    return conversational or (chat_template and has_template)


def _messages(text: Text, role: str) -> list:
    return text if isinstance(text, list) else [{"role": role, "content": text}]


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode_prompt(tokenizer, prompt: Text, chat_template: bool = True) -> list[int]:
    """Token ids of a prompt ready for generation (chat template with the generation prompt
    when used, see the module docstring)."""
    if uses_chat_template(tokenizer, prompt, chat_template):
        text = tokenizer.apply_chat_template(_messages(prompt, "user"), tokenize=False,
                                             add_generation_prompt=True)
        return _ids(tokenizer, text, special=False)
    return _ids(tokenizer, prompt, special=True)


def encode_prompts_left_padded(tokenizer, prompts: list, chat_template: bool = True):
    """encode_prompt for each prompt, left padded with the tokenizer's pad id (what
    generation of a batch needs): (input_ids, attention_mask), int64 tensors (B, S)."""
    rows = [encode_prompt(tokenizer, p, chat_template) for p in prompts]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def encode_example(tokenizer, example: PreferenceExample, max_length: Optional[int] = None,
                   max_prompt_length: Optional[int] = None,
                   chat_template: bool = True) -> EncodedExample:
    """One preference row -> prompt, chosen and rejected ids (see the module docstring)."""
    if uses_chat_template(tokenizer, example, chat_template):
        prompt = _messages(example.prompt, "user")
        prompt_ids = encode_prompt(tokenizer, prompt)
        full = [_ids(tokenizer, tokenizer.apply_chat_template(
            prompt + _messages(resp, "assistant"), tokenize=False), special=False)
            for resp in (example.chosen, example.rejected)]
    else:
        prompt_ids = _ids(tokenizer, example.prompt, special=True)
        full = [_ids(tokenizer, example.prompt + resp, special=True)
                for resp in (example.chosen, example.rejected)]
        eos = tokenizer.eos_token_id
        if eos is not None:
            full = [ids if ids and ids[-1] == eos else ids + [eos] for ids in full]
    n = min(_common_prefix(prompt_ids, ids) for ids in full)
    prompt_ids, chosen, rejected = prompt_ids[:n], full[0][n:], full[1][n:]
    limit = max_prompt_length
    if max_length is not None:
        limit = min(limit if limit is not None else max_length - 1, max_length - 1)
    if limit is not None and len(prompt_ids) > limit:
        prompt_ids = prompt_ids[len(prompt_ids) - limit:]
    if max_length is not None:
        budget = max_length - len(prompt_ids)
        chosen, rejected = chosen[:budget], rejected[:budget]
    if not chosen or not rejected:
        raise ValueError("a response is empty after tokenisation")
    return EncodedExample(prompt_ids, chosen, rejected, example.preference,
                          example.preference_labels)


def check_lengths(max_length: Optional[int], max_prompt_length: Optional[int]) -> None:
    """ValueError naming the option for lengths that leave no room for a response."""
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
    if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length})")
