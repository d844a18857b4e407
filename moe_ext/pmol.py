"""PMoL (Preference Mixture of LoRAs, arXiv 2411.01245) on moe_ext: LoRA experts grouped per
preference plus null experts, an expert-group soft loss, load balancing, and DPO where the
reference model is the same network with its adapters disabled (no second copy).

    loss = DPO(policy, reference) + aux_coef * load_balance + z_coef * z_loss
           + group_coef * group_soft_loss
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoLoRAConfig
from .data import PreferenceExample, collate_dpo
from .losses import router_losses
from .model import disable_adapters, get_molora_model, molora_layers, set_group_bias
from .training import TrainConfig, TrainResult, train


@dataclass
class DPOConfig:
    beta: float = 0.1
    label_smoothing: float = 0.0       # conservative DPO: assumed rate of flipped labels
    count_null_in_group: bool = False  # group loss: does the null expert count for every group

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"DPOConfig.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"DPOConfig.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


def pmol_config(groups: list[str], experts_per_group: int = 2, num_null_experts: int = 1,
                **kwargs) -> MoLoRAConfig:
    """MoLoRAConfig with experts 0..G*n-1 assigned to the groups in order."""
    expert_groups = {g: list(range(i * experts_per_group, (i + 1) * experts_per_group))
                     for i, g in enumerate(groups)}
    return MoLoRAConfig(num_experts=len(groups) * experts_per_group,
                        num_null_experts=num_null_experts, expert_groups=expert_groups, **kwargs)


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor,
                   response_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token) over response tokens: logits (B, S, V), ids and mask (B, S) -> (B,)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tok = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (tok * response_mask[:, 1:].to(tok.dtype)).sum(-1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float,
             label_smoothing: float = 0.0):
    """DPO (Rafailov et al.) with optional label smoothing; all inputs (B,) sequence log-probs.
    Returns (loss, margins) where margins = beta * (policy - reference) log-ratio difference."""
    margins = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    loss = -(1 - label_smoothing) * F.logsigmoid(margins) - label_smoothing * F.logsigmoid(-margins)
    return loss.mean(), margins


def pmol_loss(model: nn.Module, raw_model: nn.Module, batch: dict, dpo: DPOConfig,
              groups: list[str]):
    """One PMoL step's loss for a collated batch (data.collate_dpo)."""
    B = batch["input_ids"].shape[0] // 2
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    policy = sequence_logps(out.logits, batch["input_ids"], batch["response_mask"])
    aux = router_losses(raw_model, batch["preference"], batch["attention_mask"], groups,
                        dpo.count_null_in_group)
    with torch.no_grad(), disable_adapters(raw_model):
        ref_out = raw_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        ref = sequence_logps(ref_out.logits, batch["input_ids"], batch["response_mask"])
    loss, margins = dpo_loss(policy[:B], policy[B:], ref[:B], ref[B:], dpo.beta, dpo.label_smoothing)
    metrics = {"loss": loss.item(), "dpo_acc": (margins > 0).float().mean().item(),
               "group": aux["group"].item(), "balance": aux["load_balance"].item()}
    return loss + aux["total"], metrics


def train_pmol(model: nn.Module, examples: list[PreferenceExample], tokenizer,
               train_config: TrainConfig, dpo: Optional[DPOConfig] = None,
               batch_size: int = 16) -> TrainResult:
    """DPO + router losses over `examples`; the model must hold MoLoRA layers. Each rank
    draws its own batch_size examples per micro-step, seeded by (seed, step, micro, rank)."""
    dpo = dpo or DPOConfig()
    if not molora_layers(model):
        raise ValueError("model has no MoLoRA layers: call get_molora_model first")
    if not examples:
        raise ValueError("examples is empty")
    groups = list(model.molora_config.expert_groups)
    device = next(model.parameters()).device

    def batch_fn(step, micro, rank, world):
        rng = random.Random(hash((train_config.seed, step, micro, rank)) & 0xFFFFFFFF)
        return collate_dpo([rng.choice(examples) for _ in range(batch_size)], tokenizer, groups,
                           device)

    return train(model, batch_fn, lambda m, raw, b: pmol_loss(m, raw, b, dpo, groups),
                 train_config, describe="pmol")


@torch.no_grad()
def evaluate_pmol(model: nn.Module, examples: list[PreferenceExample], tokenizer,
                  beta: float = 0.1, batch_size: int = 64) -> dict:
    """Held-out metrics per preference: DPO preference accuracy (implicit reward of chosen >
    rejected) and, when the config has expert groups, group routing accuracy (the group with
    the most router mass, averaged over the prompt's tokens and all layers, is the
    example's preference)."""
    model.eval()
    groups = list(getattr(model, "molora_config").expert_groups)
    stats: dict[str, dict[str, float]] = {}
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        device = next(model.parameters()).device
        batch = collate_dpo(chunk, tokenizer, groups, device)
        B = len(chunk)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        policy = sequence_logps(out.logits, batch["input_ids"], batch["response_mask"])
        routed = _group_routing(model, batch, groups, B) if groups else None
        with disable_adapters(model):
            ref_logits = model(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits
        ref = sequence_logps(ref_logits, batch["input_ids"], batch["response_mask"])
        _, margins = dpo_loss(policy[:B], policy[B:], ref[:B], ref[B:], beta)
        for j, e in enumerate(chunk):
            s = stats.setdefault(e.preference, {"n": 0, "dpo_correct": 0, "route_correct": 0})
            s["n"] += 1
            s["dpo_correct"] += float(margins[j] > 0)
            if routed is not None:
                s["route_correct"] += float(groups[int(routed[j])] == e.preference)
    model.train()
    report = {p: {"n": int(s["n"]), "dpo_accuracy": s["dpo_correct"] / s["n"],
                  **({"routing_accuracy": s["route_correct"] / s["n"]} if groups else {})}
              for p, s in sorted(stats.items())}
    total = sum(s["n"] for s in stats.values())
    report["all"] = {"n": total,
                     "dpo_accuracy": sum(s["dpo_correct"] for s in stats.values()) / total}
    if groups:
        report["all"]["routing_accuracy"] = sum(s["route_correct"] for s in stats.values()) / total
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


def steer(model: nn.Module, bias: Optional[dict[str, float]]) -> None:
    """Dial the preference mix at inference: adds bias[group] to that group's router logits
    in every layer (None resets). Alias of model.set_group_bias."""
    set_group_bias(model, bias)


def build_tiny_causal_lm(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4,
                         seed: int = 0) -> nn.Module:
    """A small Llama-style causal LM built from a config (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg)


__all__ = ["DPOConfig", "pmol_config", "sequence_logps", "dpo_loss", "pmol_loss", "train_pmol",
           "evaluate_pmol", "steer", "build_tiny_causal_lm", "get_molora_model"]
