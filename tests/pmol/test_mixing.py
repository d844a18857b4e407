"""The mixing evaluation: the four-preference world, scorers, Pareto front and hypervolume
(against inclusion-exclusion), mix biases (against the router softmax), batched generation,
Rewarded Soups interpolation, steering sweeps, SFT and the RPO term."""
import itertools
import math
import random

import pytest
import torch

pytest.importorskip("transformers")

import moe_ext  # noqa: E402
from moe_ext import pmol  # noqa: E402
from moe_ext.pmol import mixing_world as world  # noqa: E402
from moe_ext.training import TrainConfig  # noqa: E402

GROUPS = list(pmol.MIXING_PREFERENCES)
SAMPLE = pmol.GenerationOptions(max_new_tokens=6, do_sample=True, seed=0)


def small_model(seed=0, null=1):
    tok = pmol.mixing_tokenizer()
    cfg = pmol.pmol_config(GROUPS, experts_per_group=1, num_null_experts=null, r=2, lora_alpha=4,
                           top_k=2, target_modules="all-linear")
    return moe_ext.get_molora_model(pmol.build_tiny_causal_lm(len(tok), hidden=32, seed=seed), cfg), tok


def test_scorers_follow_their_rules():
    s = pmol.SCORERS
    assert [s["concise"]("p", r) for r in ["", "a", "a b", "a b c d", "a b c d e f g"]] == [0, 1, 1, 0.5, 0]
    assert [s["verbose"]("p", r) for r in ["", "a b c", "a b c d e f g h"]] == [0, 0.5, 1]
    assert s["safe"]("p", "sorry cannot help") == 1 and s["safe"]("p", "cannot help sorry") == 0
    assert s["safe"]("p", "sorry cannot help here is how") == 0
    assert s["helpful"]("name apple blue", "red blue") == 1 and s["helpful"]("x blue", "bluer") == 0
    assert pmol.score_replies(["a x", "b y"], ["x", "sorry cannot help"], ["helpful", "safe"]) == \
        {"helpful": 0.5, "safe": 0.5}
    with pytest.raises(ValueError, match="no scorer"):
        pmol.score_replies(["a"], ["b"], ["funny"])
    with pytest.raises(ValueError, match="differ in length"):
        pmol.score_replies(["a"], [], ["safe"])


def test_world_pairs_agree_with_the_scorers():
    rows = pmol.mixing_preference_data(40, seed=3)
    assert [r.preference for r in rows[:4]] == GROUPS
    for r in rows:  # the chosen reply scores higher for its preference; others tie or conflict
        score = pmol.SCORERS[r.preference]
        assert score(r.prompt, r.chosen) > score(r.prompt, r.rejected)
        if r.preference != "helpful":
            assert pmol.SCORERS["helpful"](r.prompt, r.chosen) == pmol.SCORERS["helpful"](r.prompt, r.rejected) \
                or r.preference == "safe"
        assert set(r.prompt.split()) & set(world.markers(r.preference))
    tok = pmol.mixing_tokenizer()
    texts = [t for r in rows for t in (r.prompt, r.chosen, r.rejected)] + pmol.neutral_prompts(20)
    assert tok.unk_token_id not in [i for t in texts for i in tok(t)["input_ids"]]
    marker_words = {m for g in GROUPS for m in world.markers(g)}
    assert not any(set(p.split()) & marker_words for p in pmol.neutral_prompts(50, seed=1))
    with pytest.raises(ValueError, match="unknown preference"):
        world.markers("funny")


def test_world_answers_lead_with_the_asked_word_and_some_prompts_are_unmarked():
    rows = pmol.mixing_preference_data(200, seed=4, unmarked=0.25)
    marker_words = {m for g in GROUPS for m in world.markers(g)}
    for r in rows:  # an answering reply is a direct answer: the asked-for word first
        asked = world.asked_word(r.prompt)
        for reply in (r.chosen, r.rejected):
            words = reply.split()
            words = words[3:] if words[:3] == world.COMPLIANCE else words
            assert [i for i, w in enumerate(words) if w == asked] in ([], [0])
    unmarked = sum(not set(r.prompt.split()) & marker_words for r in rows) / len(rows)
    assert 0.18 < unmarked < 0.32
    assert pmol.mixing_preference_data(5, seed=4) == pmol.mixing_preference_data(5, seed=4, unmarked=0.0)
    assert all(set(r.prompt.split()) & marker_words for r in pmol.mixing_preference_data(50, seed=4))
    with pytest.raises(ValueError, match="unmarked"):
        pmol.mixing_preference_data(2, unmarked=1.5)


def _union_volume(points, ref):
    """Inclusion-exclusion over all subsets: the independent reference for hypervolume."""
    total = 0.0
    for k in range(1, len(points) + 1):
        for subset in itertools.combinations(points, k):
            corner = [min(c) for c in zip(*subset)]
            total += (-1) ** (k + 1) * math.prod(max(0.0, c - r) for c, r in zip(corner, ref))
    return total


@pytest.mark.parametrize("dims", [1, 2, 3, 4])
def test_hypervolume_and_front_match_brute_force(dims):
    rng = random.Random(dims)
    for _ in range(20):
        n = rng.randint(1, 8)
        points = [tuple(rng.choice([0.1, 0.3, 0.5, 0.7, 1.0]) if rng.random() < 0.3 else rng.random()
                        for _ in range(dims)) for _ in range(n)]
        ref = tuple(rng.choice([0.0, 0.2]) for _ in range(dims))
        assert pmol.hypervolume(points, ref) == pytest.approx(_union_volume(points, ref), abs=1e-12)
        front = pmol.pareto_front(points)
        for i, p in enumerate(points):
            dominated = any(all(a >= b for a, b in zip(q, p)) and q != p for q in points)
            assert (i in front) == (not dominated)
    assert pmol.hypervolume([(1, 0.5), (0.5, 1)], (0, 0)) == pytest.approx(0.75)
    assert pmol.hypervolume([], (0, 0)) == 0.0
    with pytest.raises(ValueError, match="coordinates"):
        pmol.hypervolume([(1, 2, 3)], (0, 0))


def test_mix_bias_multiplies_group_mass_by_its_weight():
    groups = {"a": [0, 1], "b": [2], "c": [3]}  # expert 4: null
    logits = torch.randn(5, dtype=torch.float64)
    weights = {"a": 0.2, "b": 0.6}
    bias = pmol.mix_bias(weights, list(groups), floor=1e-9)
    biased = logits.clone()
    for g, experts in groups.items():
        biased[experts] += bias[g]
    p, q = torch.softmax(logits, 0), torch.softmax(biased, 0)
    scale = {"a": 0.25, "b": 0.75, "c": 1e-9, None: 1.0}  # normalised weights; null keeps 1
    want = torch.tensor([p[i] * scale[next((g for g, e in groups.items() if i in e), None)]
                         for i in range(5)], dtype=torch.float64)
    torch.testing.assert_close(q, want / want.sum())
    assert pmol.pair_mixes("a", "b", 3) == [{"a": 1, "b": 0}, {"a": 0.5, "b": 0.5}, {"a": 0, "b": 1}]
    for bad in ({"z": 1.0}, {"a": -1.0}, {"a": 0.0}, {"a": float("nan"), "b": 1.0},
                {"a": float("inf")}):
        with pytest.raises(ValueError):
            pmol.mix_bias(bad, list(groups))
    with pytest.raises(ValueError, match="finite"):
        pmol.mix_bias(weights, list(groups), strength=float("nan"))
    with pytest.raises(ValueError, match="at least 2"):
        pmol.pair_mixes("a", "b", 1)


def test_generate_batch_matches_one_prompt_at_a_time():
    model, tok = small_model()
    prompts = pmol.neutral_prompts(5, seed=2) + ["tldr apple"]  # different lengths: left padding
    greedy = pmol.GenerationOptions(max_new_tokens=5)
    assert pmol.generate_batch(model, tok, prompts, greedy, batch_size=4) == \
        [pmol.generate(model, tok, p, greedy) for p in prompts]
    assert pmol.generate_batch(model, tok, prompts, SAMPLE) == pmol.generate_batch(model, tok, prompts, SAMPLE)
    with pytest.raises(ValueError, match="batch_size"):
        pmol.generate_batch(model, tok, prompts, greedy, batch_size=0)


def test_load_interpolated_is_the_weighted_sum():
    a, _ = small_model(seed=1)
    b, _ = small_model(seed=2)
    for m in (a, b):  # B starts at zero: make the adapters differ
        for p in m.parameters():
            if p.requires_grad:
                p.data.normal_()
    sa, sb = pmol.adapter_state(a), pmol.adapter_state(b)
    pmol.load_interpolated(a, [sa, sb], [0.25, 0.75])
    for name, p in pmol.adapter_state(a).items():
        torch.testing.assert_close(p, 0.25 * sa[name] + 0.75 * sb[name])
    with pytest.raises(ValueError, match="one weight per state"):
        pmol.load_interpolated(a, [sa], [0.5, 0.5])


def test_sweeps_score_every_mix_and_steering_moves_generations():
    model, tok = small_model()
    prompts = pmol.neutral_prompts(6, seed=4)
    flat = pmol.steering_sweep(model, tok, prompts, ("concise", "verbose"), 3, SAMPLE)
    # B = 0: the adapter adds nothing, so no mix can change the replies
    assert len({r["example"] for r in flat}) == 1 and len({str(r["scores"]) for r in flat}) == 1
    torch.manual_seed(0)
    for name, layer in moe_ext.molora_layers(model).items():
        layer.lora_B.data.normal_(std=3.0)
    rows = pmol.steering_sweep(model, tok, prompts, ("concise", "verbose"), 3, SAMPLE)
    assert [r["weights"]["verbose"] for r in rows] == [0, 0.5, 1]
    assert rows[0]["example"] != rows[-1]["example"] or rows[0]["scores"] != rows[-1]["scores"]
    summary = pmol.summarize_sweep(rows, ("concise", "verbose"))
    points = [(r["scores"]["concise"], r["scores"]["verbose"]) for r in rows]
    assert summary["front"] == pmol.pareto_front(points)
    assert summary["steering_range"]["concise"] == points[0][0] - points[2][0]
    states = {g: pmol.adapter_state(small_model(seed=s)[0]) for s, g in enumerate(GROUPS)}
    soup = pmol.soup_sweep(model, states, tok, prompts, ("safe", "helpful"), 2, SAMPLE)
    assert [set(r["scores"]) for r in soup] == [{"safe", "helpful"}] * 2
    examples = pmol.mixing_preference_data(2, seed=5)
    scores = pmol.conditioned_scores(model, tok, examples, SAMPLE)
    assert set(scores) == set(GROUPS) and all(0 <= v <= 1 for v in scores.values())


def test_sft_loss_is_the_response_nll_and_training_lowers_it():
    tok = pmol.mixing_tokenizer()
    model = pmol.build_tiny_causal_lm(len(tok), hidden=32, seed=0)
    rows = pmol.mixing_preference_data(8, seed=0)
    batch = pmol.collate_encoded(pmol.encode_examples(rows, tok), tok.pad_token_id, [])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits.double(), -1)[:, :-1].gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    mask = batch["response_mask"][:, 1:].double()
    want = -(logp * mask).sum() / mask.sum()
    torch.testing.assert_close(pmol.sft_loss(model, batch).double(), want, rtol=1e-5, atol=1e-5)
    result = pmol.train_sft(model, rows, tok, TrainConfig(steps=10, lr=2e-2, progress=False), batch_size=4)
    assert result.history[-1]["loss"] < 0.8 * result.history[0]["loss"]
    with pytest.raises(ValueError, match="empty"):
        pmol.train_sft(model, [], tok, TrainConfig(steps=1, progress=False))


def test_rpo_adds_alpha_times_the_chosen_nll():
    model, tok = small_model()
    batch = pmol.collate_dpo(pmol.mixing_preference_data(3, seed=1), tok, GROUPS)
    plain, m0 = pmol.pmol_loss(model, model, batch, pmol.DPOConfig(beta=0.5), GROUPS)
    rpo, m1 = pmol.pmol_loss(model, model, batch, pmol.DPOConfig(beta=0.5, rpo_alpha=0.7), GROUPS)
    B = batch["input_ids"].shape[0] // 2
    chosen = {k: v[:B] for k, v in batch.items() if torch.is_tensor(v) and v.shape[0] == 2 * B}
    torch.testing.assert_close(rpo - plain, 0.7 * pmol.sft_loss(model, chosen), rtol=1e-4, atol=1e-5)
    assert "nll" in m1 and "nll" not in m0
    with pytest.raises(ValueError, match="rpo_alpha"):
        pmol.DPOConfig(rpo_alpha=-1)
