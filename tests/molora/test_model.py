"""MoLoRA inside HF transformers models: injection, freezing, adapters off, save/load, PEFT."""
import copy
import dataclasses
import json
import os

import pytest
import torch

import moe_ext
from moe_ext import MoLoRAConfig, MoLoRALinear

transformers = pytest.importorskip("transformers")


def tiny_llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


def tiny_gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0,
        eos_token_id=0)).eval()


def tiny_bert():
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=32)).eval()


def randomize_b(model):
    with torch.no_grad():
        for layer in moe_ext.molora_layers(model).values():
            layer.lora_B.normal_(0, 0.5)


IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))


def outputs(model):
    out = model(input_ids=IDS)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("make,targets,expected", [
    (tiny_llama, ["q_proj", "v_proj"], 4),
    (tiny_llama, "all-linear", 14),
    (tiny_llama, r".*mlp\.(up|down)_proj", 4),
    (tiny_gpt2, ["c_attn", "c_fc"], 4),
    (tiny_gpt2, "all-linear", 8),
    (tiny_bert, ["query", "value"], 4),
])
def test_inject_freeze_and_identity(make, targets, expected):
    model = make()
    before = outputs(model).detach()
    cfg = MoLoRAConfig(r=4, num_experts=3, num_null_experts=1, top_k=2, target_modules=targets)
    moe_ext.get_molora_model(model, cfg)
    layers = moe_ext.molora_layers(model)
    assert len(layers) == expected
    assert "lm_head" not in " ".join(layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.split(".")[-1] in ("lora_A", "lora_B") or n.endswith("router.weight")
                             for n in trainable)
    torch.testing.assert_close(outputs(model), before)  # B = 0: a fresh adapter changes nothing
    randomize_b(model)
    changed = outputs(model)
    assert (changed - before).abs().max() > 1e-3
    with moe_ext.disable_adapters(model):
        torch.testing.assert_close(outputs(model), before)  # exactly the base model
    torch.testing.assert_close(outputs(model), changed)    # and back on afterwards
    assert all(r.probs.shape[1] == 4 for r in moe_ext.last_routing(model).values())


def test_target_modules_errors():
    with pytest.raises(ValueError, match="target_modules"):
        moe_ext.get_molora_model(tiny_llama(), MoLoRAConfig())
    with pytest.raises(ValueError, match="matched no"):
        moe_ext.get_molora_model(tiny_llama(), MoLoRAConfig(target_modules=["nope"]))
    model = moe_ext.get_molora_model(tiny_llama(), MoLoRAConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already"):
        moe_ext.get_molora_model(model, MoLoRAConfig(target_modules=["q_proj"]))


def test_save_load_round_trip(tmp_path):
    cfg = MoLoRAConfig(r=4, num_experts=4, top_k=2, target_modules="all-linear",
                       expert_groups={"a": [0, 1], "b": [2, 3]})
    model = moe_ext.get_molora_model(tiny_llama(), cfg)
    randomize_b(model)
    want = outputs(model).detach()
    moe_ext.save_molora(model, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    meta = json.load(open(tmp_path / "adapter_config.json"))
    assert meta["format_version"] == 1 and meta["moe_ext_config"]["num_experts"] == 4
    loaded = moe_ext.load_molora(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(outputs(loaded), want)
    assert loaded.molora_config == dataclasses.replace(cfg, modules_to_save=[])  # resolved


def test_load_rejects_mismatched_model_and_files(tmp_path):
    model = moe_ext.get_molora_model(tiny_llama(), MoLoRAConfig(r=4, target_modules=["q_proj"]))
    moe_ext.save_molora(model, str(tmp_path))
    with pytest.raises(ValueError, match="does not fit"):
        moe_ext.load_molora(tiny_gpt2(), str(tmp_path))
    bigger = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=50, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="shape"):
        moe_ext.load_molora(bigger, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        moe_ext.load_molora(tiny_llama(), str(tmp_path / "missing"))
    meta = json.load(open(tmp_path / "adapter_config.json"))
    meta["format_version"] = 99
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format_version"):
        moe_ext.load_molora(tiny_llama(), str(tmp_path))


def test_one_expert_equals_peft_lora():
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    ours = moe_ext.get_molora_model(copy.deepcopy(base), MoLoRAConfig(
        r=4, lora_alpha=8, num_experts=1, top_k=1, target_modules=["q_proj", "v_proj"]))
    randomize_b(ours)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, layer in moe_ext.molora_layers(ours).items():
            peft_layer = theirs.get_submodule("base_model.model." + name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A[0])
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B[0])
    torch.testing.assert_close(outputs(ours), theirs(input_ids=IDS).logits, atol=1e-5, rtol=1e-5)


def test_group_bias_steers_every_layer():
    cfg = MoLoRAConfig(r=2, num_experts=4, top_k=1, target_modules=["q_proj"],
                       expert_groups={"a": [0, 1], "b": [2, 3]})
    model = moe_ext.get_molora_model(tiny_llama(), cfg)
    moe_ext.set_group_bias(model, {"b": 50.0})
    outputs(model)
    for r in moe_ext.last_routing(model).values():
        assert (r.experts >= 2).all()
    moe_ext.set_group_bias(model, None)
    with pytest.raises(ValueError, match="unknown expert group"):
        moe_ext.set_group_bias(model, {"c": 1.0})


def test_gpt2_conv1d_layer_matches_base_shape():
    model = tiny_gpt2()
    moe_ext.get_molora_model(model, MoLoRAConfig(r=2, num_experts=2, top_k=1,
                                                 target_modules=["c_attn"]))
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, MoLoRALinear) and layer.in_features == 32 and layer.out_features == 96


def test_plain_sequential_runs_disables_and_round_trips(tmp_path):
    """get_molora_model on an nn.Sequential (which calls every child as a layer): it still
    runs forward, with modules_to_save too; adapters off is exactly the base; save/load
    round-trips (issue 30: the internal originals were a child and broke forward)."""
    torch.manual_seed(0)

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))

    base = make()
    x = torch.randn(3, 8)
    want = base(x)
    config = MoLoRAConfig(r=2, num_experts=2, top_k=1, target_modules=["0"], modules_to_save=["2"])
    model = moe_ext.get_molora_model(make(), config)
    assert [n for n, _ in model.named_children()] == ["0", "1", "2"]
    randomize_b(model)
    with torch.no_grad():
        model[2].weight.add_(1.0)
    out = model(x)
    assert out.shape == (3, 4) and not torch.allclose(out, want)
    with moe_ext.disable_adapters(model):
        torch.testing.assert_close(model(x), want)
    moe_ext.save_molora(model, str(tmp_path))
    again = moe_ext.load_molora(make(), str(tmp_path))
    torch.testing.assert_close(again(x), out)
