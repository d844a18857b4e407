"""Preference data for PMoL: rows come from the shared loader (moe_ext.data: TRL's formats,
a `preference` label per row) and are tokenised once with any Hugging Face tokenizer;
`collate_dpo` pads them into DPO batches."""
from __future__ import annotations

import json
import random
from typing import Callable, Optional, Sequence

import torch

from ..data import EncodedExample, PreferenceExample, encode_example, load_preferences
from ..utils.io import write_text


def load_preference_jsonl(path: str, label_column: str = "preference") -> list[PreferenceExample]:
    """Rows of a JSON Lines (or JSON, Parquet, `datasets`) file in any TRL preference format
    (moe_ext.data.load_preferences)."""
    return load_preferences(path, label_column)


def save_preference_jsonl(examples: list[PreferenceExample], path: str) -> None:
    write_text(path, "".join(json.dumps(e.__dict__) + "\n" for e in examples))


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


def collate_encoded(encoded: Sequence[EncodedExample], pad: int, groups: list[str],
                    device: Optional[torch.device] = None) -> dict[str, torch.Tensor]:
    """Batch of B encoded examples -> input_ids (2B, S): the B chosen then the B rejected
    sequences, right-padded; attention_mask (2B, S); response_mask (2B, S), 1 on response
    tokens; preference (2B,) index into `groups` (-1: unlabelled, no group loss)."""
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
             "preference": preference_index(encoded, groups).repeat(2)}
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
