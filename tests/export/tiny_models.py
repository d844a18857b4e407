"""Small random-weight Llama and Qwen2 models with MoLoRA adapters and a byte-level BPE
tokenizer, all built offline, for the generation-export tests (fixtures in conftest.py)."""
import os

import torch
import transformers

import moe_ext
from moe_ext import MoLoRAConfig

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Preference mixing routes each token to a few LoRA experts.",
    "A concise answer is short; a safe answer avoids harm; a verbose answer explains.",
    "onnxruntime keeps the key and value cache on the device between steps.",
    "Hello world! How are you today? I am fine, thank you.",
]
PROMPTS = ["Hello world", "The quick brown fox jumps over", "A safe answer"]
GROUPS = {"concise": [0, 1], "safe": [2, 3]}
# a steerable adapter's groups, listed out of sorted order: the graphs' inputs take the
# sorted order (concise, verbose), the routers the config's (verbose, concise)
MIX_GROUPS = {"verbose": [0, 1], "concise": [2, 3]}


def bpe_tokenizer():
    """A byte-level BPE (vocab 300) trained on SENTENCES, left padding, <pad>/<s>/</s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        padding_side="left")


def tiny_lm(arch: str, vocab_size: int, seed: int = 0):
    """2 layers, hidden 32, 4 query heads over 2 KV heads; pad 0, bos 1, eos 2."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval()
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(use_sliding_window=False,
                                                                  **common)).eval()


def with_molora(model, seed: int = 0, steerable: bool = False):
    """PMoL-style adapter: 4 LoRA experts in 2 groups + 1 null expert, top-2, with random
    B and router weights so that the experts change the output and routing varies.
    steerable: the routers take a preference mix over MIX_GROUPS, with random mix_scale and
    mix_proj so that the mix changes the routing."""
    moe_ext.get_molora_model(model, MoLoRAConfig(
        r=4, target_modules="all-linear", num_experts=4, num_null_experts=1, top_k=2,
        expert_groups=MIX_GROUPS if steerable else GROUPS, steerable=steerable))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in moe_ext.molora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
            layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=g))
            if steerable:
                layer.mix_scale.copy_(1.0 + torch.rand(1, generator=g))
                layer.mix_proj.copy_(torch.randn(layer.mix_proj.shape, generator=g) * 2.0)
    return model


def export_tiny(arch: str, folder, tokenizer, steerable: bool = False, **kwargs):
    """(PyTorch model, path of its generation graph)."""
    from moe_ext.export import export_causal_lm

    model = with_molora(tiny_lm(arch, len(tokenizer)), steerable=steerable)
    path = export_causal_lm(model, os.path.join(str(folder), f"{arch}.onnx"), **kwargs)
    return model, path
