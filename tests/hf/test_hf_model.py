"""A MoLoRA model as transformers users meet it: save_pretrained writes the adapter only and
reloads exactly (recording its base), another architecture is refused, modules_to_save
(the reward head) is trained and saved, router losses come back as `aux_loss`."""
import json
import os

import pytest
import torch

import moe_ext
from moe_ext import pmol
from moe_ext.hf import load_molora_model
from moe_ext.molora import losses

from hf_fixtures import GROUPS, transformers, hf_models  # noqa: F401 (fixtures)

IDS = torch.randint(3, 400, (2, 9), generator=torch.Generator().manual_seed(1))


def molora(model, **kw):
    cfg = pmol.pmol_config(GROUPS, experts_per_group=1, num_null_experts=1, r=4, lora_alpha=8,
                           top_k=2, target_modules=["q_proj", "v_proj"], **kw)
    model = moe_ext.get_molora_model(model, cfg)
    with torch.no_grad():
        for layer in moe_ext.molora_layers(model).values():
            layer.lora_B.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_save_pretrained_writes_the_adapter_and_reloads_exactly(arch, hf_models, tmp_path):
    model = molora(transformers.AutoModelForCausalLM.from_pretrained(hf_models[arch]))
    want = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    meta = json.load(open(tmp_path / "adapter_config.json"))
    assert meta["base_model_name_or_path"] == hf_models[arch]
    assert meta["base_model_class"] == type(model).__name__
    loaded = load_molora_model(str(tmp_path))             # the base it records
    assert type(loaded) is type(model)
    torch.testing.assert_close(loaded(input_ids=IDS).logits, want, rtol=0, atol=0)
    other = "qwen2" if arch == "llama" else "llama"
    with pytest.raises(ValueError, match=f"trained on a {type(model).__name__}"):
        moe_ext.load_molora(transformers.AutoModelForCausalLM.from_pretrained(hf_models[other]),
                            str(tmp_path))


def test_reward_head_is_trained_saved_and_restored(hf_models, tmp_path):
    def seq_cls():  # the head is new, initialised from the seed
        torch.manual_seed(0)
        return transformers.AutoModelForSequenceClassification.from_pretrained(hf_models["llama"],
                                                                                num_labels=1)
    model = molora(seq_cls())
    assert model.molora_config.modules_to_save == ["score"]
    assert model.score.weight.requires_grad
    base_score = seq_cls()(input_ids=IDS).logits
    with torch.no_grad():
        model.score.weight.add_(1.0)
    want = model(input_ids=IDS).logits
    with moe_ext.disable_adapters(model):                 # the base, head included
        torch.testing.assert_close(model(input_ids=IDS).logits, base_score)
    model.save_pretrained(tmp_path)
    loaded = moe_ext.load_molora(seq_cls(), str(tmp_path)).eval()
    torch.testing.assert_close(loaded(input_ids=IDS).logits, want, rtol=0, atol=0)


def test_aux_loss_in_the_output_like_transformers_moe_models(hf_models):
    model = molora(transformers.AutoModelForCausalLM.from_pretrained(hf_models["llama"]),
                   router_z_loss_coef=0.1, group_loss_coef=0.5).train()
    assert model.config.output_router_logits and model.config.router_aux_loss_coef == 1.0
    mask = torch.ones_like(IDS)
    mask[1, 6:] = 0
    pref = torch.tensor([0, 2])
    out = model(input_ids=IDS, attention_mask=mask, preference=pref)
    want = losses.router_losses(model, pref, mask)["total"]
    torch.testing.assert_close(out.aux_loss, want)
    stacked = model(input_ids=torch.cat([IDS, IDS]), attention_mask=torch.cat([mask, mask]),
                    preference=pref)                      # TRL: chosen then rejected rows
    torch.testing.assert_close(stacked.aux_loss, want)
    plain = model(input_ids=IDS, labels=IDS)
    lm = model(input_ids=IDS, labels=IDS, output_router_logits=False)
    assert "aux_loss" not in lm
    model.config.router_aux_loss_coef = 2.0
    torch.testing.assert_close(model(input_ids=IDS, labels=IDS).loss, lm.loss + 2.0 * plain.aux_loss)
    with moe_ext.disable_adapters(model):                 # nothing routed: no router loss
        assert "aux_loss" not in model(input_ids=IDS)
    assert model.config.output_router_logits             # only hidden during the forward
    with pytest.raises(ValueError, match="preference has 3 rows"):
        model(input_ids=IDS, preference=torch.tensor([0, 1, 2]))


def test_generate_with_steering(hf_models):
    model = molora(transformers.AutoModelForCausalLM.from_pretrained(hf_models["qwen2"]))
    tok = transformers.AutoTokenizer.from_pretrained(hf_models["qwen2"])
    options = pmol.GenerationOptions(max_new_tokens=6)
    text = pmol.generate(model, tok, "explain apple river", options)
    assert text == pmol.generate(model, tok, "explain apple river", options)   # greedy
    steered = {g: pmol.generate(model, tok, "explain apple river", options, {g: 30.0}) for g in GROUPS}
    assert len(set(steered.values()) | {text}) > 1        # the bias changes what is generated
    assert all(float(m.logit_bias.abs().sum()) == 0 for m in moe_ext.molora_layers(model).values())
    sampled = [pmol.generate(model, tok, "explain", pmol.GenerationOptions(
        max_new_tokens=6, do_sample=True, top_k=50, top_p=0.9, temperature=1.5, seed=s)) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1]


def test_relative_base_is_recorded_absolute_and_missing_folders_are_named(hf_models, tmp_path,
                                                                          monkeypatch):
    """A base loaded by a relative path is recorded as an absolute folder, so the adapter
    loads from any working directory (it was recorded as typed, and read from elsewhere
    went to the Hub); a path that is no folder is named as a missing folder at once."""
    import shutil
    from moe_ext.hf import load_pretrained

    shutil.copytree(hf_models["llama"], tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    model = molora(load_pretrained("base"))
    want = model(input_ids=IDS).logits
    moe_ext.save_molora(model, "adapter")
    meta = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert meta["base_model_name_or_path"] == str(tmp_path / "base")
    assert meta["base_model_source"] == "folder"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    torch.testing.assert_close(load_molora_model("../adapter")(input_ids=IDS).logits, want)
    for missing in ("./nope", "../nope", "a/b/c", str(tmp_path / "nope")):
        with pytest.raises(FileNotFoundError, match="folder .* does not exist"):
            load_pretrained(missing)


def test_a_copied_train_pmol_output_loads_its_own_base_model(hf_models, tmp_path):
    """The adapter of a train-pmol output records its base_model/ by absolute path; a copy
    of the output (the original gone) loads the copy's base_model/."""
    import shutil
    from moe_ext.export.from_adapter import resolve_adapter, resolve_base

    original = tmp_path / "run"
    shutil.copytree(hf_models["llama"], original / "base_model")
    model = molora(transformers.AutoModelForCausalLM.from_pretrained(str(original / "base_model")))
    want = model(input_ids=IDS).logits
    moe_ext.save_molora(model, str(original / "adapter"))
    shutil.copytree(original, tmp_path / "copy")
    shutil.rmtree(original)
    copy = str(tmp_path / "copy" / "adapter")
    torch.testing.assert_close(load_molora_model(copy)(input_ids=IDS).logits, want)
    assert resolve_base(*resolve_adapter(copy), None) == str(tmp_path / "copy" / "base_model")
