"""Fixtures of the generation-export tests: the offline tokenizer, a left-padded batch, and
the exported tiny Llama and Qwen2 (each exported once per session)."""
import pytest

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from tiny_models import PROMPTS, bpe_tokenizer, export_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return bpe_tokenizer()


@pytest.fixture(scope="session")
def prompts(tokenizer):
    """A batch of 3 prompts of different lengths, left padded."""
    return tokenizer(PROMPTS, return_tensors="pt", padding=True)


@pytest.fixture(scope="session")
def graphs(tmp_path_factory, tokenizer):
    """graphs(arch) -> (model, OrtCausalLM) for "llama" or "qwen2": fp32, last-position
    logits, exported on first use."""
    from moe_ext.export import OrtCausalLM

    made = {}

    def get(arch: str):
        if arch not in made:
            model, path = export_tiny(arch, tmp_path_factory.mktemp(arch), tokenizer)
            made[arch] = (model, OrtCausalLM(path))
        return made[arch]

    return get


@pytest.fixture(params=["llama", "qwen2"])
def exported(request, graphs):
    return graphs(request.param)
