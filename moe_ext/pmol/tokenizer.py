"""The built-in tokenizer: whitespace words over a fixed vocabulary, built as a real Hugging
Face tokenizer (PreTrainedTokenizerFast over a `tokenizers` WordLevel model), so that it is
saved as tokenizer.json and loads with AutoTokenizer. Its chat template gives the layout
`<bos> prompt <sep> response <eos>`; no download needed."""
from __future__ import annotations

PAD, BOS, EOS, SEP, UNK = "<pad>", "<bos>", "<eos>", "<sep>", "<unk>"
SPECIALS = [PAD, BOS, EOS, SEP, UNK]

# user and system turns end with <sep>, assistant turns with <eos>
CHAT_TEMPLATE = ("{{ bos_token }} {% for message in messages %}"
                 "{% if message['role'] == 'assistant' %}{{ message['content'] }} {{ eos_token }} "
                 "{% else %}{{ message['content'] }} " + SEP + " {% endif %}{% endfor %}")


def word_tokenizer(words):
    """A PreTrainedTokenizerFast over the special tokens then the sorted distinct `words`."""
    from tokenizers import Tokenizer, models, pre_tokenizers  # with transformers (hf extra)
    from transformers import PreTrainedTokenizerFast

    vocab = SPECIALS + sorted(set(words) - set(SPECIALS))
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=UNK))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, pad_token=PAD, bos_token=BOS,
                                        eos_token=EOS, sep_token=SEP, unk_token=UNK)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def word_tokenizer_from_examples(examples):
    """word_tokenizer over the words of the prompts and responses of PreferenceExamples."""
    words = set()
    for e in examples:
        for text in (e.prompt, e.chosen, e.rejected):
            contents = [text] if isinstance(text, str) else [m["content"] for m in text]
            words.update(w for c in contents for w in c.split())
    return word_tokenizer(sorted(words))
