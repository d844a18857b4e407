"""Training and evaluating a PMoL adapter: DPO + router losses over preference examples on
the shared training loop (moe_ext.training), and held-out DPO and routing accuracy per
preference."""
from __future__ import annotations

import random
from typing import Optional

import torch
from torch import nn

from ..molora import disable_adapters, is_steerable, molora_layers
from ..training import TrainConfig, TrainResult, train
from .data import PreferenceExample, collate_encoded, encode_examples, pad_id, random_batches
from .dpo import DPOConfig, dpo_loss, pmol_loss, sequence_logps

UNLABELLED = "unlabelled"
MIX_STREAM = 0x6D6978  # keeps the mixes' random stream apart from the batches' ("mix")  # the report's row for examples without a preference label


def train_pmol(model: nn.Module, examples: list[PreferenceExample], tokenizer,
               train_config: TrainConfig, dpo: Optional[DPOConfig] = None,
               batch_size: int = 16, **encode_options) -> TrainResult:
    """DPO + router losses over `examples`; the model must hold MoLoRA layers; `tokenizer`
    any Hugging Face tokenizer (encode_options: max_length, max_prompt_length,
    chat_template, see moe_ext.data.encode_example). Each rank draws its own batch_size
    examples per micro-step, seeded by (seed, step, micro, rank); rows without a
    preference label skip the group loss. With dpo.mix_alpha (a steerable model:
    MoLoRAConfig.steerable) each pair of a step draws its own mix lambda ~ Dirichlet(mix_alpha)
    over the groups, seeded like the batch, and the step trains on the mix-weighted loss
    (dpo.mix_loss); a share dpo.mix_none_prob of the pairs trains without a mix."""
    dpo = dpo or DPOConfig()
    if not molora_layers(model):
        raise ValueError("model has no MoLoRA layers: call get_molora_model first")
    if dpo.mix_alpha is not None and not is_steerable(model):
        raise ValueError("DPOConfig.mix_alpha needs a steerable model (MoLoRAConfig.steerable "
                         "= True, `--steerable`): its routers must see the mix")
    if not examples:
        raise ValueError("examples is empty")
    groups = list(model.molora_config.expert_groups)
    device = next(model.parameters()).device
    encoded = encode_examples(examples, tokenizer, **encode_options)
    batch_fn = random_batches(encoded, pad_id(tokenizer), groups, train_config.seed, batch_size, device)
    if dpo.mix_alpha is not None:
        batch_fn = with_sampled_mixes(batch_fn, len(groups), dpo.mix_alpha, dpo.mix_none_prob,
                                      train_config.seed, device)
    return train(model, batch_fn, lambda m, raw, b: pmol_loss(m, raw, b, dpo, groups),
                 train_config, describe="pmol")


def sample_mixes(n: int, groups: int, alpha: float, rng: random.Random) -> torch.Tensor:
    """(n, groups) mixes lambda ~ Dirichlet(alpha, ..., alpha): normalised Gamma(alpha, 1)
    draws (a row whose draws all underflow to 0 becomes the uniform mix)."""
    rows = []
    for _ in range(n):
        x = [rng.gammavariate(alpha, 1.0) for _ in range(groups)]
        total = sum(x)
        rows.append([v / total for v in x] if total > 0 else [1.0 / groups] * groups)
    return torch.tensor(rows, dtype=torch.float32)


def with_sampled_mixes(batch_fn, groups: int, alpha: float, none_prob: float, seed: int,
                       device=None):
    """batch_fn whose batches also hold "mix" (B, G): one Dirichlet(alpha) mix per pair, or
    none (a row of zeros) for a share none_prob of the pairs; seeded by (seed, step, micro,
    rank) as the batch, so a resumed run sees the same mixes."""
    def fn(step, micro, rank, world):
        batch = batch_fn(step, micro, rank, world)
        # ints only: a str in the key would hash differently in every process
        rng = random.Random(hash((MIX_STREAM, seed, step, micro, rank)) & 0xFFFFFFFF)
        mix = sample_mixes(batch["labels"].shape[0], groups, alpha, rng)
        mix[[rng.random() < none_prob for _ in range(mix.shape[0])]] = 0.0  # no mix: the prompt decides
        return {**batch, "mix": mix.to(device) if device is not None else mix}

    return fn


@torch.no_grad()
def evaluate_pmol(model: nn.Module, examples: list[PreferenceExample], tokenizer,
                  beta: float = 0.1, batch_size: int = 64, **encode_options) -> dict:
    """Held-out metrics per preference: DPO preference accuracy (implicit reward of chosen >
    rejected) and, when the config has expert groups, group routing accuracy (the group with
    the most router mass, averaged over the prompt's tokens and all layers, is the
    example's preference). Unlabelled examples count under "unlabelled" and in "all"
    (DPO accuracy only)."""
    model.eval()
    groups = list(getattr(model, "molora_config").expert_groups)
    stats: dict[str, dict[str, float]] = {}
    encoded = encode_examples(examples, tokenizer, **encode_options)
    pad = pad_id(tokenizer)
    device = next(model.parameters()).device
    for i in range(0, len(examples), batch_size):
        chunk = encoded[i:i + batch_size]
        batch = collate_encoded(chunk, pad, groups, device)
        B = len(chunk)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_router_logits=False)
        policy = sequence_logps(out.logits, batch["input_ids"], batch["response_mask"])
        routed = _group_routing(model, batch, groups, B) if groups else None
        with disable_adapters(model):
            ref_logits = model(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits
        ref = sequence_logps(ref_logits, batch["input_ids"], batch["response_mask"])
        _, margins = dpo_loss(policy[:B], policy[B:], ref[:B], ref[B:], beta)
        for j, e in enumerate(chunk):
            label = str(e.preference) if e.preference is not None else UNLABELLED
            s = stats.setdefault(label, {"n": 0, "dpo_correct": 0, "route_correct": 0})
            s["n"] += 1
            s["dpo_correct"] += float(margins[j] > 0)
            if routed is not None:
                s["route_correct"] += float(groups[int(routed[j])] == label)
    model.train()
    routable = bool(groups)
    report = {p: {"n": int(s["n"]), "dpo_accuracy": s["dpo_correct"] / s["n"],
                  **({"routing_accuracy": s["route_correct"] / s["n"]}
                     if routable and p != UNLABELLED else {})}
              for p, s in sorted(stats.items())}
    total = sum(s["n"] for s in stats.values())
    report["all"] = {"n": total,
                     "dpo_accuracy": sum(s["dpo_correct"] for s in stats.values()) / total}
    labelled = [s for p, s in stats.items() if p != UNLABELLED]
    if routable and labelled:
        report["all"]["routing_accuracy"] = (sum(s["route_correct"] for s in labelled)
                                             / sum(s["n"] for s in labelled))
    return report


def _group_routing(model, batch, groups, B) -> torch.Tensor:
    """(B,) index of the group with the most router mass over each chosen sequence's prompt."""
    config = model.molora_config
    prompt_mask = (batch["attention_mask"] * (1 - batch["response_mask"]))[:B].reshape(-1)
    masses = 0
    for layer in molora_layers(model).values():
        probs = layer.last_routing.probs.reshape(batch["input_ids"].shape[0], -1, probs_dim(layer))
        per_group = torch.stack([probs[:B, :, config.expert_groups[g]].sum(-1) for g in groups], -1)
        masses = masses + (per_group.reshape(-1, len(groups)) * prompt_mask[:, None]).reshape(
            B, -1, len(groups)).sum(1)
    return torch.argmax(masses, dim=-1)


def probs_dim(layer) -> int:
    return layer.config.num_experts + layer.config.num_null_experts
