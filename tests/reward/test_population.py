"""The PersonalLLM-style population, the adaptation methods against independent references,
the evaluation protocol, per-user routing, the ensemble baselines and interpretability."""
import math

import pytest
import torch
import torch.nn.functional as F

from moe_ext import reward
from moe_ext.reward import interpret
from moe_ext.reward.evaluate import ProtocolConfig, evaluate_population
from moe_ext.reward.population import PopulationConfig, make_population

SMALL = dict(prompts=400, base_rewards=4, response_dim=8, prompt_dim=4, topics=3,
             seen_users=30, unseen_users=12, seen_user_share=0.05, adapt_pool=20, eval_pairs=10)


@pytest.fixture(scope="module")
def pop():
    return make_population(PopulationConfig(seed=3, **SMALL))


def test_population_pairs_and_splits(pop):
    c = pop.config
    assert set(pop.seen_prompts.tolist()).isdisjoint(pop.unseen_prompts.tolist())
    assert len(pop.seen_prompts) + len(pop.unseen_prompts) == c.prompts
    per = pop.per_user
    assert per == round(c.seen_user_share * len(pop.seen_prompts)) and len(pop.train) == per * c.seen_users
    seen = set(pop.seen_prompts.tolist())
    for pairs, weights in ((pop.train, pop.seen_weights), (pop.unseen_eval["unseen_prompts"],
                                                           pop.unseen_weights)):
        for i in range(0, len(pairs), 7):  # each pair is (argmax, argmin) of its user's score
            scores = pop.base_scores[pairs.prompt[i]].double() @ weights[pairs.user[i]].double()
            assert pairs.chosen[i] == scores.argmax() and pairs.rejected[i] == scores.argmin()
    assert set(pop.train.prompt.tolist()) <= seen
    assert not set(pop.unseen_eval["unseen_prompts"].prompt.tolist()) & seen
    for u in range(c.seen_users):  # a seen user's held-out seen prompts are not their training ones
        own = set(pop.train.prompt[pop.train.user == u].tolist())
        ev = pop.seen_eval["seen_prompts"]
        assert not own & set(ev.prompt[ev.user == u].tolist())
    torch.testing.assert_close(pop.seen_weights.sum(-1), torch.ones(c.seen_users))
    again = make_population(PopulationConfig(seed=3, **SMALL))
    assert torch.equal(again.train.chosen, pop.train.chosen)
    with pytest.raises(ValueError, match="base_rewards"):
        PopulationConfig(base_rewards=40)


def test_adaptation_methods_against_references():
    g = torch.Generator().manual_seed(0)
    margins = torch.randn(5, 7, 4, generator=g, dtype=torch.float64) * 2
    loss = -F.logsigmoid(margins)
    w = reward.adapt_weights(margins, "hyre", beta=0.7)
    torch.testing.assert_close(w, torch.softmax(-0.7 * loss.sum(1), -1).float())
    for s in range(5):  # Hedge: online multiplicative updates, one pair at a time
        u = torch.full((4,), 0.25, dtype=torch.float64)
        for i in range(7):
            u = u * torch.exp(-0.3 * loss[s, i])
            u = u / u.sum()
        torch.testing.assert_close(reward.adapt_weights(margins[s], "hedge", eta=0.3), u.float())
    torch.testing.assert_close(reward.adapt_weights(margins, "hedge", eta=0.7), w)  # one pass = HyRe
    batched = reward.adapt_weights(margins, "gradient", steps=20)
    for s in range(5):  # the batched sets are independent problems
        torch.testing.assert_close(batched[s], reward.adapt_weights(margins[s], "gradient", steps=20),
                                   atol=1e-5, rtol=1e-4)
    # the mixture the gradient method finds fits the set better than the uniform one
    def fit(wt):
        return -F.logsigmoid((margins.float() * wt.unsqueeze(1)).sum(-1)).mean(1)
    assert (fit(batched) <= fit(torch.full((5, 4), 0.25)) + 1e-6).all()
    with pytest.raises(ValueError, match="method"):
        reward.adapt_weights(margins, "bayes")
    with pytest.raises(ValueError, match="shape"):
        reward.adapt_weights(torch.zeros(3, 0, 2))


def test_protocol_on_oracle_and_universal(pop):
    proto = ProtocolConfig(shots=[2, 20], resamples=3, seen_users=10, steps=30,
                           methods=["hyre", "gradient"])
    K = pop.config.base_rewards
    oracle = reward.SparseMoERewardModel(pop.config.prompt_dim, pop.config.response_dim, K)
    uni = reward.UniversalRewardModel(pop.config.response_dim)
    with torch.no_grad():  # experts = the base rewards (exact up to each prompt's positive gain)
        oracle.head_w.copy_(pop.base_directions * 10)
        oracle.head_b.zero_()
        uni.net.weight.copy_(pop.base_directions.sum(0, keepdim=True))
        uni.net.bias.zero_()
    res = evaluate_population(oracle, pop, proto)
    assert res["users"] == {"seen": 10, "unseen": 12}
    assert set(res["adapted"]["hyre"]) == {"seen/seen_prompts", "seen/unseen_prompts",
                                           "unseen/seen_prompts", "unseen/unseen_prompts"}
    for method in ("hyre", "gradient"):
        assert res["adapted"][method]["unseen/unseen_prompts"][20]["mean"] > 0.93
        assert (res["adapted"][method]["unseen/unseen_prompts"][20]["mean"]
                >= res["adapted"][method]["unseen/unseen_prompts"][2]["mean"]
                > res["no_adaptation"]["unseen/unseen_prompts"] + 0.05)
    res = evaluate_population(uni, pop, proto)
    ev = pop.unseen_eval["unseen_prompts"]  # macro-average per user, computed by hand
    p, c, r = pop.embeddings(ev)
    right = (uni(p, c) > uni(p, r)).float()
    want = sum(right[ev.user == u].mean() for u in range(12)) / 12
    assert res["no_adaptation"]["unseen/unseen_prompts"] == pytest.approx(want.item(), abs=1e-6)
    cell = res["adapted"]["gradient"]["unseen/unseen_prompts"]
    assert cell[2]["mean"] == pytest.approx(want.item(), abs=1e-6) and cell[2]["std"] == 0


def test_per_user_routing_and_straight_through_gradient(pop):
    model = reward.SparseMoERewardModel(pop.config.prompt_dim, pop.config.response_dim, 3, top_k=1,
                                        num_users=pop.config.seen_users)
    p, c, r = pop.embeddings(pop.train)
    with torch.no_grad():
        model.user_bias.normal_()
    users = pop.train.user
    gates, _ = model.gates(p[:5], users[:5])
    manual = F.one_hot((model.router(p[:5]) + model.user_bias[users[:5]]).argmax(-1), 3).float()
    torch.testing.assert_close(gates, manual)
    population, _ = model.gates(p[:5])  # no user: the mean over the training users
    each = torch.stack([model.gates(p[:5], torch.full((5,), u))[0] for u in range(model.num_users)])
    torch.testing.assert_close(population, each.mean(0))
    stats = interpret.routing_stats(model, p[:5], users[:5])  # routed with each prompt's user
    torch.testing.assert_close(torch.tensor(stats["load"]), manual.mean(0))
    for straight, has_grad in ((False, False), (True, True)):
        model.zero_grad()
        loss, _ = reward.moe_loss(model, p[:64], c[:64], r[:64],
                                  reward.FitConfig(dense_router_grad=straight, sparsity_coef=0,
                                                   balance_coef=0, diversity_coef=0), users[:64])
        loss.backward()
        assert (model.user_bias.grad.abs().sum() > 1e-6) == has_grad  # top-1 gates alone: ~0
    with pytest.raises(ValueError, match="user_ids"):
        model.gates(p[:2], torch.tensor([0, 999]))
    with pytest.raises(ValueError, match="num_users"):
        reward.SparseMoERewardModel(4, 8, 2).gates(p[:2], torch.tensor([0, 1]))
    reward.fit(model, p, c, r, user_ids=users, epochs=1, progress=False)
    with pytest.raises(ValueError, match="user_ids"):
        reward.fit(model, p, c, r, user_ids=users[:3], epochs=1, progress=False)


def test_ensemble_baselines(pop):
    p, c, r = pop.embeddings(pop.train)
    uni = reward.UniversalRewardModel(pop.config.response_dim)
    reward.fit(uni, p, c, r, epochs=2, progress=False)
    heads = reward.random_heads(uni, num_heads=8, scale=1.0, seed=0)
    torch.testing.assert_close(heads.expert_rewards(c[:5])[:, 0], uni(None, c[:5]))
    spread = (heads.weight - uni.net.weight).norm(dim=1)
    assert spread[0] == 0 and torch.allclose(spread[1:], spread[1:].new_full((7,), spread[1].item()))
    assert not any(t.requires_grad for t in heads.parameters())
    free = reward.HeadEnsemble(pop.config.response_dim, 4, anchor_coef=0.0, init_scale=3.0)
    anchored = reward.HeadEnsemble(pop.config.response_dim, 4, anchor_coef=1.0, init_scale=3.0)
    for model in (free, anchored):
        torch.manual_seed(0)
        reward.fit(model, p, c, r, epochs=20, progress=False)
    drift = [(m.weight - m.start).norm() for m in (free, anchored)]
    assert drift[1] < drift[0]  # the anchor keeps heads near their own random starts
    assert reward.pairwise_accuracy(free, p, c, r) > 0.6
    with pytest.raises(ValueError, match="num_heads"):
        reward.HeadEnsemble(4, 0)


def test_interpretability():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(200, 3, generator=g, dtype=torch.float64)
    margins = torch.stack([2 * base[:, 2], base[:, 0], base[:, 1] + 0.01 * base[:, 0]], 1)
    m = interpret.base_reward_match(margins, base)
    assert m["base_to_expert"] == [1, 2, 0] and m["expert_to_base"] == [2, 0, 1]
    assert m["mean_best_correlation"] == pytest.approx(1.0, abs=1e-3)
    flipped = interpret.base_reward_match(margins * torch.tensor([1.0, -1.0, 1.0]), base)
    assert flipped["correlation"][1][0] == pytest.approx(-1.0, abs=1e-6)  # signed: the
    assert flipped["best_correlation_per_base"][0] < 0.1  # opposite preference is no match
    assert interpret.keywords(["red apple", "red car"], ["blue car", "green tree"], 2) == ["red", "apple"]
    # the text category world in embedding mode, with a router that reads the marker words
    # and experts with a known taste: the summaries must name both
    from moe_ext.reward import synthetic
    from moe_ext.reward.embed import embed
    from moe_ext.pmol.synthetic import MARKERS
    rows = synthetic.text_category_rows(40, seed=1)
    texts = [[row[k] for row in rows] for k in ("prompt", "chosen", "rejected")]
    dim = 4096  # few hash collisions between marker and topic words
    emb = [embed(t, dim=dim) for t in texts]
    names = ["concise", "verbose", "safe"]
    model = reward.SparseMoERewardModel(dim, dim, 3, top_k=1)
    with torch.no_grad():
        model.router.weight.copy_(10 * torch.stack([embed(MARKERS[n], dim=dim).sum(0) for n in names]))
        model.router.bias.zero_()
        model.head_w.copy_(torch.stack([-embed(["a b c d e f"], dim=dim)[0],
                                        embed(["a b c d e f"], dim=dim)[0],
                                        embed(["sorry cannot help"], dim=dim)[0]]))
    lab = torch.tensor([row["category"] for row in rows])
    assert reward.purity_nmi(model.route(emb[0]).argmax(-1), lab)[0] == 1.0
    stats = interpret.routing_stats(model, emb[0])
    assert stats["dead_experts"] == [] and stats["routing_entropy"] < stats["max_entropy"]
    torch.testing.assert_close(torch.tensor(stats["load"]), torch.bincount(lab, minlength=3) / len(lab))
    out = interpret.expert_summaries(model, *texts, embeddings=emb, top=2, words=4)
    assert [e["expert"] for e in out] == [0, 1, 2] and all(len(e["top_prompts"]) == 2 for e in out)
    for e, name in enumerate(names):
        assert set(out[e]["prompt_keywords"]) <= set(MARKERS[name]) and out[e]["prompt_keywords"]
        assert all(set(p.split()) & set(MARKERS[name]) for p in out[e]["top_prompts"])
    assert {"sorry", "cannot", "help"} <= set(out[2]["prefers"])
    assert math.isfinite(out[2]["load"])
