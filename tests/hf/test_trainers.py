"""TRL's DPOTrainer and RewardTrainer and HF Trainer on MoLoRA models: a few steps each with
the router aux loss in the loss (its coefficient changes the router gradient), per-row
preference labels to the group loss, the reference = adapters off, adapter-only
checkpoints that reload exactly, and an identical resume."""
import os

import pytest
import torch

import moe_ext
from moe_ext import pmol
from moe_ext.hf.trainer import MoLoRATrainer

from hf_fixtures import GROUPS, as_conversational, transformers, hf_models  # noqa: F401 (fixtures)

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")
from moe_ext.hf.trl_trainers import AdaptersOffReference, MoLoRADPOTrainer, MoLoRARewardTrainer  # noqa: E402

COMMON = dict(report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1, seed=0,
              save_strategy="steps", save_steps=3, max_steps=3, learning_rate=1e-2, bf16=False)


def rows(n=12, conversational=False):
    data = pmol.synthetic_preference_data(n // 3, seed=4)
    return [as_conversational(e) if conversational else dict(e.__dict__) for e in data]


def config(**kw):
    return pmol.pmol_config(GROUPS, experts_per_group=1, num_null_experts=1, r=4, lora_alpha=8,
                            top_k=2, target_modules=["q_proj", "v_proj"], group_loss_coef=0.5, **kw)


def router_grads(model):
    return torch.cat([m.router.weight.grad.flatten() for m in moe_ext.molora_layers(model).values()])


def reloads_exactly(model, checkpoint, fresh):
    assert "adapter_model.safetensors" in os.listdir(checkpoint)
    assert "model.safetensors" not in os.listdir(checkpoint)
    ids = torch.randint(3, 400, (2, 7), generator=torch.Generator().manual_seed(3))
    loaded = moe_ext.load_molora(fresh, checkpoint).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits,
                                   rtol=0, atol=0)


def test_dpo_trainer(hf_models, tmp_path):
    folder = hf_models["llama"]
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = moe_ext.get_molora_model(transformers.AutoModelForCausalLM.from_pretrained(folder), config())
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, beta=0.5, **COMMON)
    trainer = MoLoRADPOTrainer(model, args=args, train_dataset=datasets.Dataset.from_list(
        rows(conversational=True)), processing_class=tok)
    assert isinstance(trainer.ref_model, AdaptersOffReference)
    assert not list(trainer.ref_model.parameters())        # no second copy of the model
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert batch["preference"].shape == (4,) and set(batch["preference"].tolist()) <= {0, 1, 2}
    with torch.no_grad():   # B = 0 at the start: the routers would not matter to DPO yet
        for layer in moe_ext.molora_layers(model).values():
            layer.lora_B.normal_(0, 0.1)
    ids = torch.randint(3, 400, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():                                  # the reference is exactly the base
        base = transformers.AutoModelForCausalLM.from_pretrained(folder)(input_ids=ids).logits
        torch.testing.assert_close(trainer.ref_model(input_ids=ids).logits, base, rtol=0, atol=0)
        assert (model(input_ids=ids).logits - base).abs().max() > 1e-4
    grads = {}
    for coef in (0.0, 3.0):
        trainer.router_aux_loss_coef = coef
        model.zero_grad()
        trainer.compute_loss(model, dict(batch)).backward()
        grads[coef] = router_grads(model)
    assert grads[0.0].abs().sum() > 0                      # DPO reaches the routers ...
    assert not torch.allclose(grads[0.0], grads[3.0])      # ... and so does the aux loss
    model.zero_grad()
    trainer.router_aux_loss_coef = 1.0
    trainer.train()
    logged = [h for h in trainer.state.log_history if "aux_loss" in h]
    assert logged and all(h["aux_loss"] > 0 for h in logged)
    reloads_exactly(model, tmp_path / "checkpoint-3", transformers.AutoModelForCausalLM.from_pretrained(folder))


def test_reward_trainer_trains_and_saves_the_head(hf_models, tmp_path):
    folder = hf_models["qwen2"]
    tok = transformers.AutoTokenizer.from_pretrained(folder)

    def seq_cls():
        torch.manual_seed(0)
        return transformers.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1)

    model = moe_ext.get_molora_model(seq_cls(), config())
    head = model.score.weight.detach().clone()
    args = trl.RewardConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, **COMMON)
    trainer = MoLoRARewardTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows()),
                                  processing_class=tok)
    trainer.train()
    assert not torch.equal(model.score.weight, head)       # the head trains (modules_to_save)
    assert any("aux_loss" in h for h in trainer.state.log_history)
    reloads_exactly(model, tmp_path / "checkpoint-3", seq_cls())


def lm_dataset(tok):
    out = []
    for e in rows(16):
        ids = tok(f"{e['prompt']} {e['chosen']}")["input_ids"][:16]
        ids += [tok.pad_token_id] * (16 - len(ids))
        out.append({"input_ids": ids, "labels": ids, "preference": e["preference"]})
    return datasets.Dataset.from_list(out)


def test_hf_trainer_resume_is_identical(hf_models, tmp_path):
    folder = hf_models["gpt2"]
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    cfg = pmol.pmol_config(GROUPS, experts_per_group=1, r=4, target_modules=["c_attn"], group_loss_coef=0.5)

    class StopAt2(transformers.TrainerCallback):   # an interrupted run
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 2

    def run(out, stop=False, resume=None):
        torch.manual_seed(0)
        model = moe_ext.get_molora_model(transformers.AutoModelForCausalLM.from_pretrained(folder), cfg)
        args = transformers.TrainingArguments(output_dir=str(out), per_device_train_batch_size=4,
                                              **{**COMMON, "max_steps": 4, "save_steps": 2})
        trainer = MoLoRATrainer(model=model, args=args, train_dataset=lm_dataset(tok),
                                callbacks=[StopAt2()] if stop else None)
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    straight, _ = run(tmp_path / "a")
    run(tmp_path / "b", stop=True)
    resumed, trainer = run(tmp_path / "b", resume=str(tmp_path / "b" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    plain = transformers.Trainer(model=resumed, args=trainer.args)   # save_model: adapter only
    plain.save_model(str(tmp_path / "final"))
    reloads_exactly(resumed, tmp_path / "final", transformers.AutoModelForCausalLM.from_pretrained(folder))
