"""Preference data for PMoL: TRL's format (JSONL with prompt, chosen, rejected) plus a
`preference` label, and DPO batch collation. The built-in synthetic data set is in
synthetic.py, the word-level tokenizer in tokenizer.py."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..utils.io import read_jsonl, write_text


@dataclass(frozen=True)
class PreferenceExample:
    prompt: str
    chosen: str
    rejected: str
    preference: str


def load_preference_jsonl(path: str) -> list[PreferenceExample]:
    """One JSON object per line with string fields prompt, chosen, rejected, preference."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"preference data file not found: {path!r}")
    examples = []
    for lineno, row in read_jsonl(path):
        missing = [k for k in ("prompt", "chosen", "rejected", "preference")
                   if not isinstance(row.get(k), str)]
        if missing:
            raise ValueError(f"{path}:{lineno}: missing or non-string fields {missing}")
        examples.append(PreferenceExample(row["prompt"], row["chosen"], row["rejected"],
                                          row["preference"]))
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def save_preference_jsonl(examples: list[PreferenceExample], path: str) -> None:
    write_text(path, "".join(json.dumps(e.__dict__) + "\n" for e in examples))


def encode_pair(tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    """<bos> prompt <sep> response <eos> and the index where the response starts."""
    p = [tokenizer.bos_id] + tokenizer.encode(prompt) + [tokenizer.sep_id]
    return p + tokenizer.encode(response) + [tokenizer.eos_id], len(p)


def collate_dpo(examples: list[PreferenceExample], tokenizer, groups: list[str],
                device: Optional[torch.device] = None) -> dict[str, torch.Tensor]:
    """Batch of B examples -> input_ids (2B, S): the B chosen then the B rejected sequences,
    right-padded; attention_mask (2B, S); response_mask (2B, S), 1 on response tokens;
    preference (2B,) index into `groups` (-1 for a label not in groups)."""
    seqs, starts = [], []
    for field in ("chosen", "rejected"):
        for e in examples:
            ids, start = encode_pair(tokenizer, e.prompt, getattr(e, field))
            seqs.append(ids)
            starts.append(start)
    S = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), S), tokenizer.pad_id, dtype=torch.long)
    attention = torch.zeros(len(seqs), S, dtype=torch.long)
    response = torch.zeros(len(seqs), S, dtype=torch.long)
    for i, (ids, start) in enumerate(zip(seqs, starts)):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention[i, :len(ids)] = 1
        response[i, start:len(ids)] = 1
    pref = torch.tensor([groups.index(e.preference) if e.preference in groups else -1
                         for e in examples] * 2)
    batch = {"input_ids": input_ids, "attention_mask": attention, "response_mask": response,
             "preference": pref}
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch
