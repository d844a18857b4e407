"""Fixtures and helpers of the Hugging Face tests (imported by each test module: a
conftest.py here would shadow tests/conftest.py for `from conftest import ...`).

Small random-weight Llama, Qwen2 and GPT-2 causal LMs saved to local folders with a real
byte-level BPE tokenizer (trained here with `tokenizers`) and a ChatML chat template, as a
user's model folders would be; and preference data for them. Everything offline."""
import json
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moe_ext import pmol  # noqa: E402

SPECIALS = ["<|endoftext|>", "<s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                 "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GROUPS = list(pmol.SYNTHETIC_PREFERENCES)


def bpe_tokenizer():
    """A byte-level BPE tokenizer trained on the synthetic world's words, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    rows = pmol.synthetic_preference_data(40, seed=5)
    text = [f"{e.prompt} {e.chosen} {e.rejected}" for e in rows]
    text += ["the quick brown fox jumps over the lazy dog", "user assistant system"] * 3
    rng.shuffle(text)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=420, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(arch: str, vocab: int, tok):
    torch.manual_seed(0)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    if arch == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **ids))
    if arch == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **ids))
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128, **ids))


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """{"llama" | "qwen2" | "gpt2": folder} with config, weights and tokenizer."""
    root = tmp_path_factory.mktemp("hf_models")
    tok = bpe_tokenizer()
    folders = {}
    for arch in ("llama", "qwen2", "gpt2"):
        folder = root / arch
        model = build_model(arch, len(tok), tok)
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        folders[arch] = str(folder)
    return folders


def as_conversational(e):
    return {"prompt": [{"role": "user", "content": e.prompt}],
            "chosen": [{"role": "assistant", "content": e.chosen}],
            "rejected": [{"role": "assistant", "content": e.rejected}],
            "preference": e.preference}


@pytest.fixture(scope="session")
def pref_files(tmp_path_factory):
    """{"standard": jsonl, "conversational": jsonl}: 60 labelled rows of the synthetic
    world (every 7th row unlabelled), the second one in TRL's conversational format."""
    root = tmp_path_factory.mktemp("prefs")
    rows = pmol.synthetic_preference_data(20, seed=3)
    std = [dict(e.__dict__) for e in rows]
    conv = [as_conversational(e) for e in rows]
    for i in range(0, len(rows), 7):
        std[i]["preference"] = None
        conv[i].pop("preference")
    paths = {}
    for name, data in (("standard", std), ("conversational", conv)):
        paths[name] = str(root / f"{name}.jsonl")
        with open(paths[name], "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in data))
    return paths
