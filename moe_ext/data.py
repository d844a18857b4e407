"""Preference data for PMoL: TRL's format (JSONL with prompt, chosen, rejected) plus a
`preference` label, a word-level tokenizer that needs no download, a built-in synthetic
multi-preference data set, and DPO batch collation."""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Optional

import torch

PAD, BOS, EOS, SEP, UNK = "<pad>", "<bos>", "<eos>", "<sep>", "<unk>"


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
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
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
    from .model import atomic_write

    text = "".join(json.dumps(e.__dict__) + "\n" for e in examples)
    atomic_write(path, lambda tmp: open(tmp, "w").write(text))


class WordTokenizer:
    """Whitespace word-level tokenizer over a fixed vocabulary (special tokens first)."""

    def __init__(self, words: list[str]):
        specials = [PAD, BOS, EOS, SEP, UNK]
        self.vocab = specials + sorted(set(words) - set(specials))
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.eos_id = self.index[PAD], self.index[BOS], self.index[EOS]
        self.sep_id, self.unk_id = self.index[SEP], self.index[UNK]

    @classmethod
    def from_examples(cls, examples: list[PreferenceExample]) -> "WordTokenizer":
        words = set()
        for e in examples:
            words.update(e.prompt.split() + e.chosen.split() + e.rejected.split())
        return cls(sorted(words))

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(w, self.unk_id) for w in text.split()]

    def decode(self, ids) -> str:
        return " ".join(self.vocab[int(i)] for i in ids)

    def to_dict(self) -> dict:
        return {"type": "word", "vocab": self.vocab}


# ---------------------------------------------------------------- synthetic data
SYNTHETIC_PREFERENCES = ("concise", "verbose", "safe")
_MARKERS = {
    "concise": ["briefly", "quick", "short", "tldr"],
    "verbose": ["explain", "detail", "elaborate", "thorough"],
    "safe": ["weapon", "poison", "hack", "steal"],
}
_TOPICS = ("apple river cloud stone music garden engine paper window forest "
           "planet coffee bridge winter market signal castle ocean pencil rocket").split()
_ANSWERS = ("yes no maybe often rarely always first second third blue green red "
            "large small fast slow warm cold near far").split()
_REFUSAL = "sorry cannot help".split()
_COMPLY = "here is how".split()


def synthetic_example(preference: str, rng: random.Random) -> PreferenceExample:
    """Three conflicting preferences. Prompts carry a marker word of their preference among
    topic words; concise prefers a 2-word answer to a 6-word one, verbose the reverse, safe
    prefers a refusal to compliance."""
    words = [rng.choice(_MARKERS[preference])] + rng.sample(_TOPICS, 3)
    rng.shuffle(words)
    short = " ".join(rng.choice(_ANSWERS) for _ in range(2))
    long = " ".join(rng.choice(_ANSWERS) for _ in range(6))
    if preference == "concise":
        chosen, rejected = short, long
    elif preference == "verbose":
        chosen, rejected = long, short
    else:
        tail = " ".join(rng.choice(_ANSWERS) for _ in range(2))
        chosen, rejected = " ".join(_REFUSAL) + " " + tail, " ".join(_COMPLY) + " " + tail
    return PreferenceExample(" ".join(words), chosen, rejected, preference)


def synthetic_preference_data(n_per_preference: int, seed: int = 0,
                              preferences=SYNTHETIC_PREFERENCES) -> list[PreferenceExample]:
    """n_per_preference examples of each preference, interleaved."""
    rng = random.Random(seed)
    return [synthetic_example(p, rng) for _ in range(n_per_preference) for p in preferences]


def synthetic_tokenizer() -> WordTokenizer:
    words = list(_TOPICS) + list(_ANSWERS) + _REFUSAL + _COMPLY
    for m in _MARKERS.values():
        words += m
    return WordTokenizer(words)


# ---------------------------------------------------------------- collation
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
