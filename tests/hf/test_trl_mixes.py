"""MoLoRADPOTrainer over sampled preference mixes (mix_alpha, a steerable model): the loss
of a step is moe_ext.pmol.dpo.mix_loss's on the same batch and mixes (TRL's path and our
own trainer agree), a few steps train the mix parameters and the routers, the
`preference_labels` column reaches the loss as (B, G) labels, and bad arguments or rows
are clear errors."""
import json

import pytest
import torch

import moe_ext
from moe_ext import pmol

from hf_fixtures import GROUPS, as_conversational, transformers, hf_models  # noqa: F401 (fixtures)

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")
from moe_ext.hf.collator import PreferenceCollator  # noqa: E402
from moe_ext.hf.trl_trainers import MoLoRADPOTrainer  # noqa: E402

COMMON = dict(report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1, seed=0,
              save_strategy="no", max_steps=3, learning_rate=1e-2, bf16=False)
# one row in three labelled for several groups (with a -1), one by its `preference` alone
LABELS = [{"concise": 1, "verbose": -1}, None, {"safe": -1, "concise": 0}]


def mix_rows(n=12):
    rows = [as_conversational(e) for e in pmol.synthetic_preference_data(n // 3, seed=4)]
    return [{**r, "preference_labels": LABELS[i % 3]} for i, r in enumerate(rows)]


def steerable_model(folder, steerable=True):
    cfg = pmol.pmol_config(GROUPS, experts_per_group=1, num_null_experts=1, r=4, lora_alpha=8,
                           top_k=2, target_modules=["q_proj", "v_proj"], group_loss_coef=0.5,
                           steerable=steerable)
    torch.manual_seed(0)
    model = moe_ext.get_molora_model(transformers.AutoModelForCausalLM.from_pretrained(folder), cfg)
    with torch.no_grad():  # B = 0 at the start: experts that change the output, so routing counts
        for layer in moe_ext.molora_layers(model).values():
            layer.lora_B.normal_(0, 0.1)
    return model


def trainer_for(folder, tmp_path, model=None, rows=None, batch=8, mix_alpha=0.5, mix_none_prob=0.4, **args):
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    config = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=batch,
                           **{"beta": 0.5, **COMMON, **args})
    return MoLoRADPOTrainer(model if model is not None else steerable_model(folder), args=config,
                            train_dataset=datasets.Dataset.from_list(rows or mix_rows()),
                            processing_class=tok, mix_alpha=mix_alpha, mix_none_prob=mix_none_prob)


def test_a_step_over_mixes_is_pmols_mix_loss(hf_models, tmp_path):
    """Loss and gradients of MoLoRADPOTrainer's step = pmol.mix_loss on the same batch with
    the trainer's own mixes, with label smoothing, RPO (TRL's 'sft' loss) and the router
    losses; the batch holds pairs with and without a mix and labels of -1. The trainer's
    step runs with gradient checkpointing (TRL's default), pmol's without."""
    trainer = trainer_for(hf_models["llama"], tmp_path, label_smoothing=0.1,
                          loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    model = trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    B = batch["input_ids"].shape[0] // 2
    assert batch["preference_labels"].shape == (B, len(GROUPS))
    assert (batch["preference_labels"] == -1).any()
    lam = trainer.batch_mixes(B, step=0, micro=0)   # what the first training micro-batch draws
    assert 0 < int((lam.sum(-1) > 0).sum()) < B
    model.zero_grad()
    # as in trainer.train(): gradient checkpointing, whose recomputation must see the mix too
    model.activation_checkpointing_enable(trainer.args.gradient_checkpointing_kwargs)
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    model.activation_checkpointing_disable()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ours = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "response_mask": batch["completion_mask"], "preference": batch["preference"].repeat(2),
            "labels": batch["preference_labels"], "mix": lam}
    expected, metrics = pmol.mix_loss(model, model, ours, pmol.DPOConfig(
        beta=0.5, label_smoothing=0.1, rpo_alpha=0.5), GROUPS)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert grads and {n for n in grads if "mix_" in n}
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    logged = trainer._metrics["train"]
    assert logged["mix/mixed"] == [pytest.approx(metrics["mixed"])]
    assert logged["mix/accuracies"] == [pytest.approx(metrics["dpo_acc"])]
    assert logged["mix/nll"] == [pytest.approx(metrics["nll"], rel=1e-5)]
    # the next micro-batch of the step draws other mixes; the same key, the same ones
    assert not torch.equal(trainer.batch_mixes(B, 0, 1), lam)
    torch.testing.assert_close(trainer.batch_mixes(B, 0, 0), lam, rtol=0, atol=0)
    model.activation_checkpointing_enable({"use_reentrant": True})  # no context_fn there: refused
    with pytest.raises(ValueError, match="use_reentrant"):
        trainer.compute_loss(model, dict(batch))


def test_training_over_mixes_trains_the_mix_and_the_routers(hf_models, tmp_path):
    trainer = trainer_for(hf_models["llama"], tmp_path, batch=4)
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()
              if "mix_" in n or "router" in n}
    assert {n.rsplit(".", 1)[-1] for n in before} >= {"mix_proj", "mix_scale", "weight"}
    trainer.train()
    for n, p in model.named_parameters():
        if n in before:
            assert not torch.equal(p, before[n]), f"{n} did not train"
    logged = [h for h in trainer.state.log_history if "mix/mixed" in h]
    assert len(logged) == 3
    assert all(0 <= h["mix/mixed"] <= 1 and 0 <= h["rewards/accuracies"] <= 1 and h["aux_loss"] > 0
               for h in logged)


def test_bad_mix_arguments_are_value_errors_naming_them(hf_models, tmp_path):
    folder = hf_models["llama"]
    model = steerable_model(folder)
    for alpha in (0, -1.0, float("nan"), float("inf"), "0.5", True):
        with pytest.raises(ValueError, match="mix_alpha must be a finite number > 0"):
            MoLoRADPOTrainer(model, mix_alpha=alpha)
    for none in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"mix_none_prob must be in \[0, 1\)"):
            MoLoRADPOTrainer(model, mix_alpha=0.5, mix_none_prob=none)
    with pytest.raises(ValueError, match="mix_alpha needs a steerable model"):
        MoLoRADPOTrainer(steerable_model(folder, steerable=False), mix_alpha=0.5)
    with pytest.raises(ValueError, match=r"loss_type must be \['sigmoid'\]"):
        trainer_for(folder, tmp_path, model=model, loss_type=["ipo"])
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        trainer_for(folder, tmp_path, model=model, label_smoothing=0.5)


def test_preference_labels_column_round_trip(hf_models, tmp_path):
    """preference_labels as dicts or JSON strings (a dataset column) -> (B, G) labels in the
    groups' order, +1 at its own preference for a row without them; bad rows are errors
    naming the row."""
    collate = PreferenceCollator(lambda examples: {"n": len(examples)}, GROUPS, multi_labels=True)
    batch = collate([{"preference": "verbose", "preference_labels": {"safe": -1, "concise": 1}},
                     {"preference": "safe", "preference_labels": '{"verbose": -1}'},
                     {"preference": "concise", "preference_labels": None},
                     {"preference": None, "preference_labels": {"concise": None, "safe": 0}},
                     {"preference": 1}])
    assert batch["n"] == 5 and batch["preference"].tolist() == [1, 2, 0, -1, 1]
    assert batch["preference_labels"].tolist() == [[1, 0, -1], [0, -1, 0], [1, 0, 0], [0, 0, 0], [0, 1, 0]]
    assert "preference_labels" not in PreferenceCollator(lambda e: {}, GROUPS)(
        [{"preference": "safe", "preference_labels": {"safe": 1}}])
    for bad, match in (({"kind": 1}, r"names \['kind'\].*not expert groups"),
                       ({"safe": 2}, "must map preference names to 1"),
                       ("{safe: 1", "not valid JSON")):
        with pytest.raises(ValueError, match=match):
            collate([{"preference": "safe", "preference_labels": {"concise": 1}},
                     {"preference": "safe", "preference_labels": bad}])
    # through the trainer: a JSON string column is kept and collated
    rows = [{**r, "preference_labels": r["preference_labels"] and json.dumps(r["preference_labels"])}
            for r in mix_rows()]
    trainer = trainer_for(hf_models["llama"], tmp_path, rows=rows, batch=12)
    trainer.args.remove_unused_columns = True  # the column is kept all the same
    batch = next(iter(trainer.get_train_dataloader()))
    expected = {json.dumps(LABELS[0]): [1, -1, 0], json.dumps(LABELS[2]): [0, 0, -1]}  # GROUPS' order
    got = sorted(batch["preference_labels"].tolist())
    want = sorted(expected.get(r["preference_labels"], [int(g == r["preference"]) for g in GROUPS])
                  for r in rows)
    assert got == want
