"""A whitespace word-level tokenizer over a fixed vocabulary: the built-in default, no
download needed."""
from __future__ import annotations

PAD, BOS, EOS, SEP, UNK = "<pad>", "<bos>", "<eos>", "<sep>", "<unk>"


class WordTokenizer:
    """Whitespace word-level tokenizer over a fixed vocabulary (special tokens first)."""

    def __init__(self, words: list[str]):
        specials = [PAD, BOS, EOS, SEP, UNK]
        self.vocab = specials + sorted(set(words) - set(specials))
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.eos_id = self.index[PAD], self.index[BOS], self.index[EOS]
        self.sep_id, self.unk_id = self.index[SEP], self.index[UNK]

    @classmethod
    def from_examples(cls, examples) -> "WordTokenizer":
        """The vocabulary of the prompts and responses of PreferenceExample-like objects."""
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
