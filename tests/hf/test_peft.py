"""PEFT interop, exact to 1e-6: a PEFT LoRA -> one-expert MoLoRA adapter and back (Llama,
GPT-2 Conv1D, rsLoRA, a reward head in modules_to_save), per-preference LoRAs into the
expert groups of a PMoL adapter, and `moe-ext convert`."""
import pytest
import torch
from safetensors.torch import load_file

import moe_ext
from moe_ext import cli
from moe_ext.hf.peft import molora_to_peft, peft_to_molora, pmol_adapter_from_peft

from hf_fixtures import transformers, hf_models  # noqa: F401 (fixtures)

peft = pytest.importorskip("peft")
IDS = torch.randint(3, 400, (2, 9), generator=torch.Generator().manual_seed(2))
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def base(folder, cls=transformers.AutoModelForCausalLM, **kw):
    torch.manual_seed(0)
    return cls.from_pretrained(folder, **kw).eval()


def peft_lora(folder, arch, out, seed=0, r=4, alpha=8, **kw):
    torch.manual_seed(seed)
    model = peft.get_peft_model(base(folder), peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=TARGETS[arch], init_lora_weights=False,
        fan_in_fan_out=arch == "gpt2", **kw))
    model.save_pretrained(out)
    return model.eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("arch,rslora", [("llama", False), ("gpt2", False), ("llama", True)])
def test_peft_to_molora_and_back_exact(arch, rslora, hf_models, tmp_path):
    folder = hf_models[arch]
    theirs = peft_lora(folder, arch, tmp_path / "peft", use_rslora=rslora)
    want = logits(theirs)
    assert (want - logits(base(folder))).abs().max() > 1e-3  # the LoRA does something
    peft_to_molora(str(tmp_path / "peft"), str(tmp_path / "molora"))
    ours = moe_ext.load_molora(base(folder), str(tmp_path / "molora")).eval()
    torch.testing.assert_close(logits(ours), want, atol=1e-6, rtol=1e-6)
    molora_to_peft(str(tmp_path / "molora"), str(tmp_path / "back"))
    again = peft.PeftModel.from_pretrained(base(folder), str(tmp_path / "back")).eval()
    torch.testing.assert_close(logits(again), want, atol=1e-6, rtol=1e-6)
    first, second = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("peft", "back"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_reward_head_in_modules_to_save(hf_models, tmp_path):
    cls = transformers.AutoModelForSequenceClassification
    folder = hf_models["llama"]
    torch.manual_seed(1)
    theirs = peft.get_peft_model(base(folder, cls, num_labels=1), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False, task_type="SEQ_CLS"))
    with torch.no_grad():
        theirs.base_model.model.score.modules_to_save["default"].weight.normal_()
    theirs.save_pretrained(tmp_path / "peft")
    peft_to_molora(str(tmp_path / "peft"), str(tmp_path / "molora"))
    ours = moe_ext.load_molora(base(folder, cls, num_labels=1), str(tmp_path / "molora")).eval()
    torch.testing.assert_close(logits(ours), logits(theirs.eval()), atol=1e-6, rtol=1e-6)


def test_per_preference_loras_initialise_the_expert_groups(hf_models, tmp_path):
    folder = hf_models["llama"]
    loras = {"helpful": peft_lora(folder, "llama", tmp_path / "a", seed=1, r=2, alpha=4),
             "harmless": peft_lora(folder, "llama", tmp_path / "b", seed=2, r=4, alpha=16)}
    config = pmol_adapter_from_peft({"helpful": str(tmp_path / "a"), "harmless": str(tmp_path / "b")},
                                    str(tmp_path / "pmol"), experts_per_group=2, num_null_experts=1)
    assert config.expert_groups == {"helpful": [0, 1], "harmless": [2, 3]} and config.r == 4
    model = moe_ext.load_molora(base(folder), str(tmp_path / "pmol")).eval()
    for group, lora in loras.items():   # routed wholly to one group: exactly its LoRA
        moe_ext.set_group_bias(model, {group: 1e4})
        torch.testing.assert_close(logits(model), logits(lora), atol=1e-6, rtol=1e-6)
    moe_ext.set_group_bias(model, None)


def test_conversion_errors_and_cli(hf_models, tmp_path, capsys):
    folder = hf_models["llama"]
    torch.manual_seed(0)
    peft.get_peft_model(base(folder), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)
                        ).save_pretrained(tmp_path / "dora")
    assert cli.main(["convert", "--from-peft", str(tmp_path / "dora"), "--output", str(tmp_path / "x")]) == 2
    assert "DoRA" in capsys.readouterr().err
    peft_lora(folder, "llama", tmp_path / "peft")
    assert cli.main(["convert", "--from-peft", str(tmp_path / "peft"), "--output", str(tmp_path / "m")]) == 0
    assert cli.main(["convert", "--to-peft", str(tmp_path / "m"), "--output", str(tmp_path / "p")]) == 0
    assert cli.main(["convert", "--from-peft-groups", f"a={tmp_path / 'peft'}", f"b={tmp_path / 'peft'}",
                     "--output", str(tmp_path / "g")]) == 0
    capsys.readouterr()
    assert cli.main(["convert", "--to-peft", str(tmp_path / "g"), "--output", str(tmp_path / "q")]) == 2
    assert "only a one-expert adapter" in capsys.readouterr().err
    assert cli.main(["convert", "--from-peft-groups", "a", "--output", str(tmp_path / "q")]) == 2
    assert "GROUP=PEFT_DIR" in capsys.readouterr().err
    with pytest.raises(ValueError, match="PEFT adapter, not a MoLoRA one"):
        moe_ext.load_molora(base(folder), str(tmp_path / "peft"))
