"""Steerable PMoL routing and losses under a mix: the mix alone decides between the groups
(MoLoRALinear.within_groups), the group loss trains the prompt's own routing, pairs with and
without a mix count equally, and a half-precision model takes a mix."""
import pytest
import torch

pytest.importorskip("transformers")

import moe_ext  # noqa: E402
from moe_ext import pmol  # noqa: E402
from moe_ext.molora import molora_layers  # noqa: E402
from steerable_models import GROUPS, mix_batch, policy_and_reference, steerable_model  # noqa: E402


def test_under_a_mix_the_mix_alone_decides_between_groups():
    """Within_groups: however sharply the router reads the prompt, under a mix the groups'
    shares of the grouped experts' mass are the mix's (mix_proj 0, mix_scale 1), the split
    inside a group is the router's own softmax there, and a row without a mix keeps the
    router's routing."""
    tok = pmol.mixing_tokenizer()
    cfg = pmol.pmol_config(GROUPS, experts_per_group=2, num_null_experts=1, r=2, lora_alpha=4,
                           top_k=3, target_modules="all-linear", steerable=True)
    torch.manual_seed(0)
    model = moe_ext.get_molora_model(pmol.build_tiny_causal_lm(len(tok), hidden=32, seed=0), cfg)
    layers = list(molora_layers(model).values())
    with torch.no_grad():
        for layer in layers:
            layer.router.weight.mul_(200.0)  # a sharp prompt router
    ids = torch.randint(5, 40, (2, 6))
    lam = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    with torch.no_grad():
        model(input_ids=ids)
        plain = [layer.last_routing.probs.clone() for layer in layers]
        with pmol.preference_mix(model, lam[:1].expand(2, 4).contiguous()):
            model(input_ids=ids)
        mixed = [(layer.last_routing.probs.double(), layer.last_routing.logits.double()) for layer in layers]
        with moe_ext.molora.layer.mix_override(lam.float()):  # row 1: no mix
            model(input_ids=ids)
        half = [layer.last_routing.probs for layer in layers]
    groups = [cfg.expert_groups[g] for g in GROUPS]
    for (probs, logits), before, rows in zip(mixed, plain, half):
        mass = torch.stack([probs[:, g].sum(-1) for g in groups], -1)           # (T, G)
        torch.testing.assert_close(mass / mass.sum(-1, keepdim=True), lam[0].expand_as(mass),
                                   rtol=1e-5, atol=1e-5)  # float32 routing
        for g in groups:  # inside a group: the router's softmax over the group's experts
            torch.testing.assert_close(probs[:, g] / probs[:, g].sum(-1, keepdim=True),
                                       torch.softmax(logits[:, g], -1), rtol=1e-5, atol=1e-5)
        T = rows.shape[0] // 2
        torch.testing.assert_close(rows[T:], before[T:])                         # no mix: as before
    sharp = torch.cat([before[:, [i for g in groups for i in g]].max(-1).values for before in plain])
    assert (sharp > 0.9).float().mean() > 0.5  # most tokens: one expert by the prompt alone


def test_pairs_with_and_without_a_mix_count_equally():
    """A batch holding both: the loss is half the mixed pairs' weighted mean plus half the
    other pairs' plain mean, whatever their numbers (here 3 against 1)."""
    model, tok = steerable_model(aux=0.0)
    model.molora_config.group_loss_coef = 0.0
    rows = pmol.mixing_preference_data(2, seed=3, preferences=("concise", "verbose"))
    lam = torch.tensor([[0.8, 0.2, 0, 0], [0.3, 0.7, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0, 0]])
    batch = mix_batch(rows, tok, lam)
    loss, metrics = pmol.mix_loss(model, model, batch, pmol.DPOConfig(beta=0.5), GROUPS)
    B = len(rows)
    pol, ref = policy_and_reference(model, batch, lam)
    per = -torch.nn.functional.logsigmoid(0.5 * ((pol[:B] - ref[:B]) - (pol[B:] - ref[B:])))
    own = torch.tensor([lam[i, GROUPS.index(r.preference)].item() for i, r in enumerate(rows)])
    expected = 0.5 * (own[:3] * per[:3]).sum() / own[:3].sum() + 0.5 * per[3]
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-5)
    assert metrics["mixed"] == 0.75


def test_the_group_loss_trains_the_prompts_routing_under_any_mix():
    """A steerable model's group loss reads the routing the prompt alone gives (softmax of
    the router logits), not the routing the mix made."""
    from moe_ext.molora import losses

    model, tok = steerable_model()
    batch = mix_batch(pmol.mixing_preference_data(2, seed=5), tok)
    with moe_ext.molora.layer.mix_override(torch.tensor([[0.0, 0.0, 1.0, 0.0]])):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    got = losses.router_losses(model, batch["preference"], batch["attention_mask"], GROUPS)["group"]
    layers = list(molora_layers(model).values())
    T = layers[0].last_routing.probs.shape[0]
    pref = batch["preference"].repeat_interleave(T // batch["preference"].shape[0])
    masks = losses.group_masks(model.molora_config, GROUPS, False, pref.device)
    mask = batch["attention_mask"].reshape(-1)

    def mean_over_layers(probs_of):
        return sum(losses.group_soft_loss(probs_of(l.last_routing), pref, masks, mask)
                   for l in layers) / len(layers)

    prompt = mean_over_layers(lambda r: torch.softmax(r.logits.float(), -1))
    routed = mean_over_layers(lambda r: r.probs)
    torch.testing.assert_close(got, prompt)
    assert got.requires_grad and abs(routed.item() - prompt.item()) > 0.1  # the mix made another routing


def test_a_half_precision_model_takes_a_mix():
    """model.half() casts the mix buffers too; the mix still routes in float32 (as the ONNX
    float16 export does) and gives the float32 model's logits to half precision."""
    model, _ = steerable_model()
    ids = torch.randint(5, 40, (2, 6))
    mix = {"concise": 0.7, "safe": 0.3}
    with torch.no_grad(), pmol.preference_mix(model, mix):
        full = model(input_ids=ids).logits
        half = model.half()(input_ids=ids).logits
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), full, rtol=0.05, atol=0.05)
