"""The built-in toy world of PMoL, no download needed: three conflicting preferences as
preference data, the tokenizer that covers them, and a tiny Llama-style base model."""
from __future__ import annotations

import random

import torch
from torch import nn

from ..data import PreferenceExample
from .tokenizer import word_tokenizer

SYNTHETIC_PREFERENCES = ("concise", "verbose", "safe")
MARKERS = {
    "concise": ["briefly", "quick", "short", "tldr"],
    "verbose": ["explain", "detail", "elaborate", "thorough"],
    "safe": ["weapon", "poison", "hack", "steal"],
}
TOPIC_WORDS = ("apple river cloud stone music garden engine paper window forest "
               "planet coffee bridge winter market signal castle ocean pencil rocket").split()
ANSWER_WORDS = ("yes no maybe often rarely always first second third blue green red "
                "large small fast slow warm cold near far").split()
REFUSAL = "sorry cannot help".split()
COMPLIANCE = "here is how".split()


def synthetic_example(preference: str, rng: random.Random) -> PreferenceExample:
    """Three conflicting preferences. Prompts carry a marker word of their preference among
    topic words; concise prefers a 2-word answer to a 6-word one, verbose the reverse, safe
    prefers a refusal to compliance."""
    words = [rng.choice(MARKERS[preference])] + rng.sample(TOPIC_WORDS, 3)
    rng.shuffle(words)
    short = " ".join(rng.choice(ANSWER_WORDS) for _ in range(2))
    long = " ".join(rng.choice(ANSWER_WORDS) for _ in range(6))
    if preference == "concise":
        chosen, rejected = short, long
    elif preference == "verbose":
        chosen, rejected = long, short
    else:
        tail = " ".join(rng.choice(ANSWER_WORDS) for _ in range(2))
        chosen, rejected = " ".join(REFUSAL) + " " + tail, " ".join(COMPLIANCE) + " " + tail
    return PreferenceExample(" ".join(words), chosen, rejected, preference)


def synthetic_preference_data(n_per_preference: int, seed: int = 0,
                              preferences=SYNTHETIC_PREFERENCES) -> list[PreferenceExample]:
    """n_per_preference examples of each preference, interleaved."""
    rng = random.Random(seed)
    return [synthetic_example(p, rng) for _ in range(n_per_preference) for p in preferences]


def synthetic_tokenizer():
    """The built-in word tokenizer (a PreTrainedTokenizerFast) over the synthetic words."""
    words = list(TOPIC_WORDS) + list(ANSWER_WORDS) + REFUSAL + COMPLIANCE
    for m in MARKERS.values():
        words += m
    return word_tokenizer(words)


HEADS = 4  # attention heads of the built-in model: its width must be a multiple


def build_tiny_causal_lm(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = HEADS,
                         seed: int = 0) -> nn.Module:
    """A small Llama-style causal LM built from a config (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg)
