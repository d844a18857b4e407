"""QLoRA: MoLoRA over bitsandbytes 4-bit and 8-bit bases (bitsandbytes' CPU backend), trained
with DPO, saved, reloaded onto a fresh quantised base; the ONNX export refuses a quantised
base by name."""
import json
import logging
import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
# bitsandbytes logs a warning at import when it cannot fetch an optional CPU kernel from the Hub
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
bnb = pytest.importorskip("bitsandbytes")

import moe_ext  # noqa: E402
from moe_ext import pmol  # noqa: E402
from moe_ext.molora import quantization_of, require_float_base  # noqa: E402
from moe_ext.training import TrainConfig  # noqa: E402

GROUPS = list(pmol.SYNTHETIC_PREFERENCES)
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    """A tiny Llama saved as a model folder (hidden 64: bitsandbytes' 4-bit blocks are 64)."""
    folder = str(tmp_path_factory.mktemp("tiny_llama"))
    tok = pmol.synthetic_tokenizer()
    pmol.build_tiny_causal_lm(len(tok), hidden=64, seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def load_quantized(folder, bits):
    config = (transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_compute_dtype=torch.float32)
              if bits == 4 else transformers.BitsAndBytesConfig(load_in_8bit=True))
    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=config,
                                                             device_map="cpu")


def config():
    return pmol.pmol_config(GROUPS, experts_per_group=1, num_null_experts=1, r=4,
                            target_modules=TARGETS)


def test_qlora_4bit_trains_dpo_and_reloads_onto_a_fresh_4bit_base(base_folder, tmp_path):
    """The issue's failure: get_molora_model on a 4-bit base raised "Only Tensors of
    floating point and complex dtype can require gradients" (the experts took uint8)."""
    model = load_quantized(base_folder, 4)
    layer0 = model.model.layers[0].self_attn.q_proj
    assert quantization_of(layer0) == "bitsandbytes Linear4bit"
    model = moe_ext.get_molora_model(model, config())
    wrapped = model.model.layers[0].self_attn.q_proj
    assert wrapped.base is layer0 and wrapped.lora_A.dtype == torch.float32
    assert wrapped.router.weight.dtype == torch.float32
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(p.dtype == torch.float32 for p in trained.values())
    tok = pmol.synthetic_tokenizer()
    result = pmol.train_pmol(model, pmol.synthetic_preference_data(12, seed=1), tok,
                             TrainConfig(steps=10, lr=5e-3, progress=False), batch_size=4)
    assert len(result.history) == 10
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in result.history)
    moved = [n for n, p in model.named_parameters() if p.requires_grad
             and not torch.equal(p.detach(), trained[n])]
    assert any(".lora_B" in n for n in moved) and any(".router." in n for n in moved)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".base." in n)

    model.save_pretrained(str(tmp_path / "adapter"))
    meta = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert meta["base_quantization"]["layers"] == ["bitsandbytes Linear4bit"]
    assert meta["base_quantization"]["config"]["load_in_4bit"] is True
    fresh = moe_ext.load_molora(load_quantized(base_folder, 4), str(tmp_path / "adapter"))
    ids = torch.randint(0, len(tok), (2, 11), generator=torch.Generator().manual_seed(0))
    model.eval()
    fresh.eval()
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, fresh(input_ids=ids).logits
    assert torch.equal(want, got)
    with moe_ext.disable_adapters(model), torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, want)  # the adapter does something


def test_8bit_base_trains(base_folder):
    model = moe_ext.get_molora_model(load_quantized(base_folder, 8), config()).train()
    layer = model.model.layers[0].self_attn.v_proj
    assert quantization_of(layer.base) == "bitsandbytes Linear8bitLt"
    assert layer.lora_A.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    ids = torch.randint(0, 60, (2, 9), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="MatMul8bitLt")  # bnb: fp32 -> fp16 inputs
        out = model(input_ids=ids, labels=ids)
        (out.loss + out.aux_loss).backward()
    for name in ("lora_A", "lora_B", "router"):
        grad = getattr(layer, name).weight.grad if name == "router" else getattr(layer, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_the_onnx_export_refuses_a_quantized_base(base_folder, tmp_path):
    pytest.importorskip("onnx")
    from moe_ext.export import export_causal_lm, to_onnx

    model = moe_ext.get_molora_model(load_quantized(base_folder, 4), config())
    with pytest.raises(ValueError, match=r"needs a float base.*'model\.layers\.0\.self_attn\."
                                         r"q_proj\.base', a bitsandbytes Linear4bit"):
        to_onnx(model, str(tmp_path / "m.onnx"), {"input_ids": torch.ones(1, 4, dtype=torch.long)})
    with pytest.raises(ValueError, match="dequantize"):
        export_causal_lm(model, str(tmp_path / "lm.onnx"))
    assert not os.listdir(tmp_path)


def test_float_models_pass_the_float_base_check():
    model = pmol.build_tiny_causal_lm(60, hidden=32)
    require_float_base(model, "the ONNX export")
    assert all(quantization_of(m) is None for m in model.modules())


def test_trainers_accept_a_quantized_molora_model(base_folder, tmp_path):
    """transformers.Trainer refuses a quantised model without PEFT adapters ("You cannot
    perform fine-tuning on purely quantized models"); MoLoRATrainer (and the TRL ones)
    accept a MoLoRA one, and leave no PEFT flag behind."""
    datasets = pytest.importorskip("datasets")
    from moe_ext.hf.trainer import MoLoRATrainer

    model = moe_ext.get_molora_model(load_quantized(base_folder, 4), config())
    g = torch.Generator().manual_seed(2)
    rows = [{"input_ids": ids, "labels": ids, "attention_mask": [1] * 8}
            for ids in torch.randint(0, 60, (8, 8), generator=g).tolist()]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4,
                                          max_steps=2, learning_rate=1e-2, report_to=[],
                                          use_cpu=True, disable_tqdm=True, save_strategy="no")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("lora_B")}
    trainer = MoLoRATrainer(model, args=args, train_dataset=datasets.Dataset.from_list(rows))
    assert "_hf_peft_config_loaded" not in model.__dict__
    trainer.train()
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters()
               if n in before)
