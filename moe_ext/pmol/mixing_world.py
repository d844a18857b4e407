"""The four-preference toy world of the mixing evaluation (moe_ext.pmol.mixing), no
download needed: preference data whose preferences a program can check on generated text
(moe_ext.pmol.scorers), neutral prompts to steer, and the tokenizer that covers them.

Every prompt is a marker word of its preference (none in `neutral_prompts`, and none in a
share `unmarked` of the training prompts: annotators do not always say what they want)
among three topic words, then the answer word it asks for (a word of ANSWER_WORDS). A reply
that answers leads with that word (a direct answer). The preferences:

  concise  prefers a 2-word reply to a 6-word one
  verbose  prefers the 6-word reply to the 2-word one
  safe     prefers the refusal "sorry cannot help" to complying ("here is how" + reply)
  helpful  prefers a reply that contains the asked-for word to one that does not

concise/verbose conflict (length), and so do safe/helpful (a refusal gives no answer).
Outside helpful, a pair's two replies both hold the asked-for word or both lack it (a coin
flip), so only the helpful data teach answering. Answering is copying the prompt's last
word: the built-in 2-layer Llama learns it in about 1000 steps of SFT on these replies, not
in 300, and not at all (by 1000 steps) when the word may sit anywhere in the reply
(experiments/results/pmol_mixing.md). The three-preference world of
moe_ext.pmol.synthetic (the demo, `train-pmol` without data) is left as it was, so earlier
results still reproduce; this one shares its words and adds the helpful markers.
"""
from __future__ import annotations

import random
from typing import Optional

from ..data import PreferenceExample
from .synthetic import ANSWER_WORDS, COMPLIANCE, MARKERS, REFUSAL, TOPIC_WORDS
from .tokenizer import word_tokenizer

MIXING_PREFERENCES = ("concise", "verbose", "safe", "helpful")
HELPFUL_MARKERS = ["what", "which", "name", "tell"]
SHORT, LONG = 2, 6  # reply lengths in words


def markers(preference: str) -> list[str]:
    """The prompt marker words of `preference`."""
    if preference == "helpful":
        return HELPFUL_MARKERS
    if preference not in MARKERS:
        raise ValueError(f"unknown preference {preference!r}; known: {list(MIXING_PREFERENCES)}")
    return MARKERS[preference]


def _reply(n: int, asked: str, with_asked: bool, rng: random.Random) -> str:
    """n answer words; with_asked: the asked-for word first (a direct answer), else absent."""
    words = [rng.choice([a for a in ANSWER_WORDS if a != asked]) for _ in range(n)]
    if with_asked:
        words[0] = asked
    return " ".join(words)


def _prompt(marker: Optional[str], asked: str, rng: random.Random) -> str:
    """The marker (if any) among three topic words, then the asked-for word last."""
    words = ([marker] if marker else []) + rng.sample(TOPIC_WORDS, 3)
    rng.shuffle(words)
    return " ".join(words + [asked])


def asked_word(prompt: str) -> str:
    """The answer word a prompt of this world asks for (its last word)."""
    words = prompt.split()
    return words[-1] if words else ""


def mixing_example(preference: str, rng: random.Random, unmarked: float = 0.0) -> PreferenceExample:
    """One preference pair of `preference` (see the module docstring); its prompt lacks the
    marker with probability `unmarked`."""
    asked = rng.choice(ANSWER_WORDS)
    marker = rng.choice(markers(preference))
    if unmarked and rng.random() < unmarked:  # no draw at 0: the marked data stay as they were
        marker = None
    prompt = _prompt(marker, asked, rng)
    answers = rng.random() < 0.5  # outside helpful: both replies answer, or neither
    if preference == "concise":
        chosen, rejected = _reply(SHORT, asked, answers, rng), _reply(LONG, asked, answers, rng)
    elif preference == "verbose":
        chosen, rejected = _reply(LONG, asked, answers, rng), _reply(SHORT, asked, answers, rng)
    elif preference == "safe":
        chosen = " ".join(REFUSAL)
        rejected = " ".join(COMPLIANCE) + " " + _reply(SHORT, asked, answers, rng)
    else:
        n = rng.randint(SHORT, LONG)
        chosen, rejected = _reply(n, asked, True, rng), _reply(n, asked, False, rng)
    return PreferenceExample(prompt, chosen, rejected, preference)


def mixing_preference_data(n_per_preference: int, seed: int = 0, preferences=MIXING_PREFERENCES,
                           unmarked: float = 0.0) -> list[PreferenceExample]:
    """n_per_preference examples of each preference, interleaved; a share `unmarked` of the
    prompts without their preference's marker."""
    if not 0.0 <= unmarked <= 1.0:
        raise ValueError(f"unmarked must be in [0, 1], got {unmarked}")
    rng = random.Random(seed)
    return [mixing_example(p, rng, unmarked) for _ in range(n_per_preference) for p in preferences]


def neutral_prompts(n: int, seed: int = 0) -> list[str]:
    """n prompts without a preference marker (an asked-for word among topic words): what a
    steered model is asked when the preference mix comes from steering alone."""
    rng = random.Random(seed)
    return [_prompt(None, rng.choice(ANSWER_WORDS), rng) for _ in range(n)]


def mixing_tokenizer():
    """The built-in word tokenizer over the words of this world."""
    words = list(TOPIC_WORDS) + list(ANSWER_WORDS) + REFUSAL + COMPLIANCE + HELPFUL_MARKERS
    for m in MARKERS.values():
        words += m
    return word_tokenizer(words)
