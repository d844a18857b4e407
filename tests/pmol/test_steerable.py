"""Steerable PMoL: routers that take a preference mix (MoLoRAConfig.steerable,
preference_mix), training over sampled mixes (mix_loss, train_pmol with mix_alpha), the
per-preference labels (preference_labels, relabel), generation with a mix (Python, CLI) and
the adapter files keeping the mix parameters."""
import json
import math

import pytest
import torch

pytest.importorskip("transformers")

import moe_ext  # noqa: E402
from moe_ext import pmol  # noqa: E402
from moe_ext.cli import main as cli_main  # noqa: E402
from moe_ext.data import PreferenceExample, load_preferences  # noqa: E402
from moe_ext.molora import MoLoRAConfig, molora_layers  # noqa: E402
from moe_ext.training import TrainConfig  # noqa: E402

from steerable_models import GROUPS, mix_batch, policy_and_reference, steerable_model  # noqa: E402


def test_config_needs_groups_and_a_bool():
    with pytest.raises(ValueError, match="steerable"):
        MoLoRAConfig(steerable=True)
    with pytest.raises(ValueError, match="steerable"):
        pmol.pmol_config(GROUPS, steerable="yes")


def test_no_mix_is_todays_model_exactly():
    """λ = None: the steerable layers route by the prompt alone, bit for bit as the same
    weights without the mix parameters."""
    steer, _ = steerable_model(seed=1)
    plain, _ = steerable_model(seed=1, steerable=False)
    plain.load_state_dict(steer.state_dict(), strict=False)
    ids = torch.randint(5, 40, (3, 7))
    with torch.no_grad():
        a = steer(input_ids=ids).logits
        with pmol.preference_mix(steer, None):
            b = steer(input_ids=ids).logits
        c = plain(input_ids=ids).logits
    assert torch.equal(a, c) and torch.equal(b, c)


def test_mix_routes_into_the_group_and_rows_take_their_own_mix():
    model, _ = steerable_model()
    ids = torch.randint(5, 40, (2, 6))
    layer = next(iter(molora_layers(model).values()))
    concise = model.molora_config.expert_groups["concise"]
    with torch.no_grad(), pmol.preference_mix(model, {"concise": 1.0}):
        model(input_ids=ids)
        probs = layer.last_routing.probs
    others = [i for g, ids in model.molora_config.expert_groups.items() if g != "concise" for i in ids]
    assert probs[:, others].sum(-1).max() < 0.01  # log(1 / 1e-3) below the concise experts
    assert probs[:, concise].sum(-1).min() > 0.7  # log 4 above the (unbiased) null expert
    with torch.no_grad():
        mixes = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
        with pmol.preference_mix(model, mixes):
            rows = model(input_ids=ids).logits
        for i in range(2):
            with pmol.preference_mix(model, mixes[i]):
                one = model(input_ids=ids[i:i + 1]).logits
            torch.testing.assert_close(rows[i:i + 1], one, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(rows[0], rows[1][None].expand_as(rows[:1])[0])


def test_mix_bias_is_log_weights_at_init():
    model, _ = steerable_model()
    layer = next(iter(molora_layers(model).values()))
    lam = torch.tensor([[0.5, 0.25, 0.25, 0.0]])
    bias = layer.mix_bias(lam)[0]
    groups = model.molora_config.expert_groups
    for g, w in zip(GROUPS, lam[0].tolist()):
        assert bias[groups[g][0]].item() == pytest.approx(math.log(4 * max(w, 1e-3)), abs=1e-5)
    assert bias[-1].item() == 0.0  # the null expert: only the learned projection


@pytest.mark.parametrize("mix,match", [
    ({"funny": 1.0}, "unknown groups"), ({"concise": -1.0}, ">= 0"),
    ({"concise": 0.0, "verbose": 0.0}, "all be zero"), ({"concise": float("nan")}, "finite"),
    ({"concise": float("inf")}, "finite"), (torch.ones(3), "shape"), ([1, 2], "dict"),
])
def test_bad_mixes_are_value_errors_naming_the_option(mix, match):
    model, tok = steerable_model()
    with pytest.raises(ValueError, match=match) as err:
        with pmol.preference_mix(model, mix, name="--mix"):
            pass
    assert "--mix" in str(err.value)
    with pytest.raises(ValueError, match=match):
        pmol.generate(model, tok, "apple river", pmol.GenerationOptions(max_new_tokens=2), mix=mix)


def test_a_model_that_is_not_steerable_refuses_a_mix_context_but_generates_by_biases():
    model, tok = steerable_model(steerable=False)
    with pytest.raises(ValueError, match="steerable"):
        with pmol.preference_mix(model, {"concise": 1.0}):
            pass
    greedy = pmol.GenerationOptions(max_new_tokens=4)
    by_mix = pmol.generate(model, tok, "apple river blue", greedy, mix={"concise": 1.0})
    by_bias = pmol.generate(model, tok, "apple river blue", greedy,
                            steer=pmol.mix_bias({"concise": 1.0}, GROUPS))
    assert by_mix == by_bias


def test_generate_with_a_mix_equals_the_mix_context():
    model, tok = steerable_model()
    greedy = pmol.GenerationOptions(max_new_tokens=5)
    prompts = ["apple river blue", "briefly stone cloud red"]
    texts = [pmol.generate_batch(model, tok, prompts, greedy, mix=m)
             for m in ({"concise": 1.0}, {"verbose": 1.0}, {"concise": 0.3, "verbose": 0.7})]
    for m, got in zip(({"concise": 1.0}, {"verbose": 1.0}, {"concise": 0.3, "verbose": 0.7}), texts):
        for p, t in zip(prompts, got):
            assert pmol.generate(model, tok, p, greedy, mix=m) == t
    assert texts[0] != texts[1]  # the mix changes the text
    with pytest.raises(ValueError, match="not both"):
        pmol.generate(model, tok, "a", greedy, mix={"concise": 1.0}, steer={"concise": 1.0})


def test_single_label_rows_are_weighted_by_their_own_preference():
    """mix_loss with single labels: each pair's DPO loss weighted by its own preference's λ
    (a weighted mean), as a hand computation from the same forward passes; a pair whose
    preference has weight 0 adds nothing."""
    model, tok = steerable_model(aux=0.0)  # no router loss: the loss is the DPO part alone
    rows = pmol.mixing_preference_data(2, seed=3, preferences=("concise", "verbose"))
    dpo = pmol.DPOConfig(beta=0.5, mix_alpha=1.0)
    lam = torch.tensor([[0.8, 0.2, 0, 0], [0.8, 0.2, 0, 0], [0.8, 0.2, 0, 0], [0.8, 0.2, 0, 0]])
    batch = mix_batch(rows, tok, lam)
    loss, metrics = pmol.mix_loss(model, model, batch, dpo, GROUPS)
    B = len(rows)
    pol, ref = policy_and_reference(model, batch, lam)
    margins = 0.5 * ((pol[:B] - ref[:B]) - (pol[B:] - ref[B:]))
    own = torch.tensor([0.8 if r.preference == "concise" else 0.2 for r in rows])
    expected = (own * -torch.nn.functional.logsigmoid(margins)).sum() / own.sum()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-5)
    # weight 0 on verbose: the verbose pairs teach nothing
    only_concise = torch.tensor([[1.0, 0, 0, 0]] * B)
    concise_rows = [r for r in rows if r.preference == "concise"]
    l1, _ = pmol.mix_loss(model, model, mix_batch(rows, tok, only_concise), pmol.DPOConfig(beta=0.5), GROUPS)
    Bc = len(concise_rows)
    l2, _ = pmol.mix_loss(model, model, mix_batch(concise_rows, tok, only_concise[:Bc]),
                          pmol.DPOConfig(beta=0.5), GROUPS)
    assert 0 < Bc < B and l1.item() == pytest.approx(l2.item(), rel=1e-4)


def test_pairs_without_a_mix_take_the_ordinary_pmol_loss():
    """A row of zeros in the batch's mix: that pair is routed by its prompt alone and takes
    the ordinary DPO + RPO + router losses (pmol_loss without a mix)."""
    model, tok = steerable_model()
    rows = pmol.mixing_preference_data(2, seed=7, preferences=("concise", "safe"))
    dpo = pmol.DPOConfig(beta=0.5, rpo_alpha=0.0)
    plain, _ = pmol.pmol_loss(model, model, mix_batch(rows, tok), dpo, GROUPS)
    none, metrics = pmol.mix_loss(model, model, mix_batch(rows, tok, torch.zeros(len(rows), 4)), dpo, GROUPS)
    torch.testing.assert_close(none, plain, rtol=1e-5, atol=1e-6)
    assert metrics["mixed"] == 0.0


def test_multi_labels_flip_the_margin():
    """A pair labelled -1 for a group counts as if chosen and rejected were swapped."""
    model, tok = steerable_model(aux=0.0)
    row = pmol.mixing_preference_data(1, seed=4, preferences=("concise",))[0]
    lam = torch.tensor([[0.0, 1.0, 0.0, 0.0]])  # all verbose
    labelled = PreferenceExample(row.prompt, row.chosen, row.rejected, None, {"verbose": -1})
    swapped = PreferenceExample(row.prompt, row.rejected, row.chosen, None, {"verbose": 1})
    dpo = pmol.DPOConfig(beta=0.5, rpo_alpha=1.0)
    a, _ = pmol.mix_loss(model, model, mix_batch([labelled], tok, lam), dpo, GROUPS)
    b, _ = pmol.mix_loss(model, model, mix_batch([swapped], tok, lam), dpo, GROUPS)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # its own `preference` label alone (concise) would get weight 0 under this mix
    single = PreferenceExample(row.prompt, row.chosen, row.rejected, "concise")
    c, _ = pmol.mix_loss(model, model, mix_batch([single], tok, lam), dpo, GROUPS)
    assert c.item() == 0.0


def test_relabel_fills_labels_from_one_scorer_per_preference():
    rows = [PreferenceExample("q", "a b", "a b c d e f", "concise"),
            PreferenceExample("q", "a b c", "x y z", None, {"safe": 0})]
    scorers = {g: pmol.SCORERS[g] for g in ("concise", "verbose", "safe")}
    out = pmol.relabel(rows, scorers)
    assert out[0].preference_labels == {"concise": 1, "verbose": -1, "safe": 0}
    assert out[1].preference_labels == {"safe": 0, "concise": 0, "verbose": 0}
    assert pmol.relabel(rows, {"concise": lambda p, r: -len(r)}, overwrite=True)[0].preference_labels == \
        {"concise": 1}
    with pytest.raises(ValueError, match="scorer 'concise'.*callable"):
        pmol.relabel(rows, {"concise": 3})
    with pytest.raises(ValueError, match="non-finite"):
        pmol.relabel(rows, {"verbose": lambda p, r: float("nan")})
    with pytest.raises(ValueError, match="margin"):
        pmol.relabel(rows, scorers, margin=-1)
    labels = pmol.data.preference_labels(out, GROUPS)
    assert labels.tolist() == [[1, -1, 0, 0], [0, 0, 0, 0]]


def test_preference_labels_round_trip_through_jsonl(tmp_path):
    rows = pmol.relabel(pmol.mixing_preference_data(2, seed=5), {"concise": pmol.SCORERS["concise"]})
    path = tmp_path / "rows.jsonl"
    pmol.save_preference_jsonl(rows, str(path))
    assert pmol.load_preference_jsonl(str(path)) == rows
    plain = tmp_path / "plain.jsonl"
    pmol.save_preference_jsonl(pmol.mixing_preference_data(1, seed=5), str(plain))
    assert "preference_labels" not in plain.read_text()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c",
                               "preference_labels": {"concise": 2}}) + "\n")
    with pytest.raises(ValueError, match="preference_labels"):
        load_preferences(str(bad))


def test_training_over_mixes_steers_and_saves(tmp_path):
    """A few steps over sampled mixes train the mix parameters; the adapter files keep them
    and a reloaded model generates the same text under a mix."""
    model, tok = steerable_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "mix_" in n}
    assert before
    data = pmol.mixing_preference_data(8, seed=6)
    result = pmol.train_pmol(model, data, tok, TrainConfig(steps=6, lr=1e-2, progress=False),
                             pmol.DPOConfig(beta=0.5, rpo_alpha=1.0, mix_alpha=0.5), batch_size=8)
    assert all(math.isfinite(h["loss"]) for h in result.history)
    changed = [n for n, p in model.named_parameters() if "mix_" in n and not torch.equal(p, before[n])]
    assert changed
    moe_ext.save_molora(model, str(tmp_path / "adapter"))
    fresh, _ = steerable_model(seed=9)
    base = pmol.build_tiny_causal_lm(len(tok), hidden=32, seed=0)
    loaded = moe_ext.load_molora(base, str(tmp_path / "adapter"))
    assert loaded.molora_config.steerable
    greedy = pmol.GenerationOptions(max_new_tokens=5)
    for m in ({"concise": 1.0}, {"verbose": 1.0}, {"safe": 0.5, "helpful": 0.5}):
        assert pmol.generate(loaded, tok, "apple river blue", greedy, mix=m) == \
            pmol.generate(model, tok, "apple river blue", greedy, mix=m)
    del fresh


def test_mixes_need_a_steerable_model_and_a_valid_alpha():
    model, tok = steerable_model(steerable=False)
    with pytest.raises(ValueError, match="steerable"):
        pmol.train_pmol(model, pmol.mixing_preference_data(2), tok, TrainConfig(steps=1, progress=False),
                        pmol.DPOConfig(mix_alpha=0.5))
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="mix_alpha"):
            pmol.DPOConfig(mix_alpha=bad)
    with pytest.raises(ValueError, match="mix_none_prob"):
        pmol.DPOConfig(mix_alpha=1.0, mix_none_prob=1.0)


def test_sampled_mixes_are_dirichlet_and_seeded():
    import random
    a = pmol.sample_mixes(4000, 3, 0.5, random.Random(0))
    b = pmol.sample_mixes(4000, 3, 0.5, random.Random(0))
    assert torch.equal(a, b) and torch.allclose(a.sum(-1), torch.ones(4000))
    assert (a >= 0).all()
    # Dirichlet(0.5, 0.5, 0.5): mean 1/3, variance (1/3)(2/3) / (1.5 + 1) = 0.0889
    assert a.mean(0).sub(1 / 3).abs().max() < 0.02
    assert a.var(0).sub(0.0889).abs().max() < 0.01


def test_cli_generate_takes_a_mix(tmp_path, capsys):
    model, tok = steerable_model()
    out = tmp_path / "run"
    pmol.PMoLRun(model, tok, {}, []).save(str(out))
    adapter = str(out / "adapter")
    greedy = pmol.GenerationOptions(max_new_tokens=4)
    code = cli_main(["generate", "--adapter", adapter, "--prompt", "apple river blue",
                     "--max-new-tokens", "4", "--mix", "concise=0.3,verbose=0.7", "--json"])
    assert code == 0
    # the last line: deepspeed, imported by the save above, logs a line to stdout on main
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["mix"] == {"concise": 0.3, "verbose": 0.7}
    assert got["text"] == pmol.generate(model, tok, "apple river blue", greedy,
                                        mix={"concise": 0.3, "verbose": 0.7})
    for mix, match in (("concise=-1", ">= 0"), ("concise=0,verbose=0", "all be zero"),
                       ("concise=nan", "finite"), ("funny=1", "unknown groups"), ("concise", "GROUP=WEIGHT")):
        code = cli_main(["generate", "--adapter", adapter, "--prompt", "a", "--mix", mix])
        err = capsys.readouterr().err
        assert code != 0 and "--mix" in err and match in err, err


def test_sampled_mixes_are_the_same_in_every_process():
    """The mixes of a step come from its (seed, step, micro, rank) alone: a resumed run in
    a new process (another PYTHONHASHSEED) draws the same ones."""
    import os
    import subprocess
    import sys
    code = ("import torch; from moe_ext.pmol.train import with_sampled_mixes; "
            "f = with_sampled_mixes(lambda *a: {'labels': torch.zeros(4, 3)}, 3, 0.5, 0.25, 7); "
            "print(f(5, 0, 0, 1)['mix'].tolist())")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": h}).stdout for h in ("1", "2")}
    assert len(outs) == 1


def test_job_with_mix_alpha_trains_a_steerable_adapter_that_loads_back(tmp_path):
    job = pmol.PMoLJob(synthetic_size=6, steps=2, batch_size=4, mix_alpha=0.5, progress=False)
    run = pmol.run_pmol_job(job, output=str(tmp_path / "out"))
    assert run.model.molora_config.steerable and run.metrics["job"]["mix_alpha"] == 0.5
    loaded = pmol.load_pmol(str(tmp_path / "out"))
    assert loaded.model.molora_config.steerable
    greedy = pmol.GenerationOptions(max_new_tokens=4)
    mix = {"concise": 0.2, "safe": 0.8}
    assert pmol.generate(loaded.model, loaded.tokenizer, "apple river", greedy, mix=mix) == \
        pmol.generate(run.model, run.tokenizer, "apple river", greedy, mix=mix)
    assert not pmol.PMoLJob().molora_config(["a", "b"]).steerable
