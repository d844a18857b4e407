"""Preference data for PMoL: rows come from the shared loader (moe_ext.data: TRL's formats,
a `preference` label per row, optionally `preference_labels`, a label per preference) and
are tokenised once with any Hugging Face tokenizer; `collate_dpo` pads them into DPO
batches; `relabel` fills the per-preference labels from one scorer per preference."""
from __future__ import annotations

import dataclasses
import json
import math
import random
from typing import Callable, Mapping, Optional, Sequence

import torch

from ..data import EncodedExample, PreferenceExample, encode_example, load_preferences
from ..data.rows import flatten
from ..utils.io import write_text


def load_preference_jsonl(path: str, label_column: str = "preference") -> list[PreferenceExample]:
    """Rows of a JSON Lines (or JSON, Parquet, `datasets`) file in any TRL preference format
    (moe_ext.data.load_preferences)."""
    return load_preferences(path, label_column)


def save_preference_jsonl(examples: list[PreferenceExample], path: str) -> None:
    def row(e: PreferenceExample) -> dict:
        d = dataclasses.asdict(e)
        if d["preference_labels"] is None:
            del d["preference_labels"]
        return d

    write_text(path, "".join(json.dumps(row(e)) + "\n" for e in examples))


def encode_examples(examples: Sequence[PreferenceExample], tokenizer, max_length=None,
                    max_prompt_length=None, chat_template: bool = True) -> list[EncodedExample]:
    """Tokenises every example (moe_ext.data.encode_example); ValueError naming the row."""
    encoded = []
    for i, e in enumerate(examples):
        try:
            encoded.append(encode_example(tokenizer, e, max_length, max_prompt_length, chat_template))
        except ValueError as err:
            raise ValueError(f"example {i}: {err}") from None
    return encoded


def pad_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (padding is masked out anyway)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def preference_index(examples, groups: list[str]) -> torch.Tensor:
    """(B,) index of each example's preference in `groups`, -1 when unlabelled or unknown."""
    return torch.tensor([groups.index(str(e.preference)) if e.preference is not None
                         and str(e.preference) in groups else -1 for e in examples])


def preference_labels(examples, groups: list[str]) -> torch.Tensor:
    """(B, G) int64 label of each example per group: its `preference_labels` where given
    (1: chosen better for that group, -1: rejected better, 0: tie or unknown), else +1 at
    its own `preference` and 0 elsewhere (a single-label row teaches its own group only)."""
    out = torch.zeros(len(examples), len(groups), dtype=torch.long)
    for i, e in enumerate(examples):
        labels = getattr(e, "preference_labels", None)
        if labels is not None:
            for g, v in labels.items():
                if g in groups:
                    out[i, groups.index(g)] = int(v)
        elif e.preference is not None and str(e.preference) in groups:
            out[i, groups.index(str(e.preference))] = 1
    return out


Scorer = Callable[[str, str], float]


def relabel(examples: Sequence[PreferenceExample], scorers: Mapping[str, Scorer],
            margin: float = 0.0, overwrite: bool = False) -> list[PreferenceExample]:
    """Examples with a label per preference: for each `scorers` entry p, a scorer
    (prompt, reply) -> float (the reply's reward for p: a programmatic score, a wrapped
    transformers reward model, a moe_ext reward model's expert or user profile, ...),
    labels[p] = 1 when score(chosen) > score(rejected) + margin, -1 when below by more
    than margin, else 0. Labels already present (a row's `preference_labels`, and its own
    `preference` as 1) are kept unless `overwrite`. Conversational fields reach the scorer
    flattened ("role: content" lines). ValueError naming the scorer for a non-finite
    score, a bad margin or a scorer that is not callable."""
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    for name, fn in scorers.items():
        if not callable(fn):
            raise ValueError(f"scorer {name!r} must be a callable (prompt, reply) -> float, "
                             f"got {type(fn).__name__}")
    out = []
    for i, e in enumerate(examples):
        labels = {} if overwrite else dict(e.preference_labels or {})
        if not overwrite and e.preference is not None:
            labels.setdefault(str(e.preference), 1)
        prompt = flatten(e.prompt)
        for name, fn in scorers.items():
            if name in labels:
                continue
            diff = float(fn(prompt, flatten(e.chosen))) - float(fn(prompt, flatten(e.rejected)))
            if not math.isfinite(diff):
                raise ValueError(f"scorer {name!r} gave a non-finite score on example {i}")
            labels[name] = 1 if diff > margin else -1 if diff < -margin else 0
        out.append(dataclasses.replace(e, preference_labels=labels))
    return out


def collate_encoded(encoded: Sequence[EncodedExample], pad: int, groups: list[str],
                    device: Optional[torch.device] = None) -> dict[str, torch.Tensor]:
    """Batch of B encoded examples -> input_ids (2B, S): the B chosen then the B rejected
    sequences, right-padded; attention_mask (2B, S); response_mask (2B, S), 1 on response
    tokens; preference (2B,) index into `groups` (-1: unlabelled, no group loss); labels
    (B, G) per-group labels of the pairs (preference_labels)."""
    seqs = [(e.prompt_ids, e.chosen_ids) for e in encoded] + [(e.prompt_ids, e.rejected_ids)
                                                            for e in encoded]
    S = max(len(p) + len(r) for p, r in seqs)
    input_ids = torch.full((len(seqs), S), pad, dtype=torch.long)
    attention = torch.zeros(len(seqs), S, dtype=torch.long)
    response = torch.zeros(len(seqs), S, dtype=torch.long)
    for i, (p, r) in enumerate(seqs):
        input_ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        attention[i, :len(p) + len(r)] = 1
        response[i, len(p):len(p) + len(r)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention, "response_mask": response,
             "preference": preference_index(encoded, groups).repeat(2),
             "labels": preference_labels(encoded, groups)}
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def collate_dpo(examples: Sequence[PreferenceExample], tokenizer, groups: list[str],
                device: Optional[torch.device] = None, **encode_options) -> dict[str, torch.Tensor]:
    """Tokenises and collates B examples (see collate_encoded); encode_options:
    max_length, max_prompt_length, chat_template."""
    encoded = encode_examples(examples, tokenizer, **encode_options)
    return collate_encoded(encoded, pad_id(tokenizer), groups, device)


def random_batches(encoded: Sequence[EncodedExample], pad: int, groups: list[str], seed: int,
                   batch_size: int, device: Optional[torch.device] = None) -> Callable:
    """The training loop's batch_fn(step, micro, rank, world): batch_size examples drawn
    with replacement, seeded by (seed, step, micro, rank) so a resumed run sees the same
    batches, collated by collate_encoded."""
    def batch_fn(step, micro, rank, world):
        rng = random.Random(hash((seed, step, micro, rank)) & 0xFFFFFFFF)
        return collate_encoded([rng.choice(encoded) for _ in range(batch_size)], pad, groups, device)

    return batch_fn
