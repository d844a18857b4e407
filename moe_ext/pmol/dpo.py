"""PMoL's objective (Preference Mixture of LoRAs, arXiv 2411.01245): DPO where the reference
model is the same network with its adapters disabled (no second copy), plus the router
losses of moe_ext.molora.losses:

    loss = DPO(policy, reference) + rpo_alpha * NLL(chosen)
           + aux_coef * load_balance + z_coef * z_loss + group_coef * group_soft_loss

NLL(chosen) is the mean negative log-likelihood per chosen response token over the batch,
as TRL's DPOConfig.rpo_alpha computes it (RPO, Pang et al. 2024, normalises per sequence
first); it keeps DPO from lowering the chosen responses'
likelihood along with the rejected ones', which otherwise leaves small models generating
text that is in neither (0 by default: plain DPO).

Training over preference mixes (DPOConfig.mix_alpha set, a steerable model): each pair i
draws its own mix lambda_i ~ Dirichlet(mix_alpha) over the G groups, the routers see it
(moe_ext.molora.preference_mix), and the loss is

    (1/B) sum_i sum_g lambda_ig |l_ig| DPO(l_ig * margin_i)  [+ rpo_alpha * the same
    weights on the NLL per token of the response group g prefers]  + load balance

with l_ig the pair's label for group g (1, -1, 0: data.preference_labels; a single-label
row has 1 at its own group, so it is weighted by its own preference's lambda). With
probability mix_none_prob a step is an ordinary PMoL step instead (no mix: the prompt
decides, with the group loss), so the model still routes by the prompt when no mix is given.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from typing import Optional

from ..molora import MoLoRAConfig, disable_adapters, preference_mix
from ..molora.losses import router_losses


@dataclass
class DPOConfig:
    beta: float = 0.1
    label_smoothing: float = 0.0       # conservative DPO: assumed rate of flipped labels
    count_null_in_group: bool = False  # group loss: does the null expert count for every group
    rpo_alpha: float = 0.0             # weight of the NLL of the chosen responses (RPO)
    mix_alpha: Optional[float] = None  # Dirichlet concentration of the sampled mixes; None: no mixes
    mix_none_prob: float = 0.25        # share of steps without a mix (when mix_alpha is set)

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"DPOConfig.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"DPOConfig.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.rpo_alpha < 0:
            raise ValueError(f"DPOConfig.rpo_alpha must be >= 0, got {self.rpo_alpha}")
        if self.mix_alpha is not None and not (isinstance(self.mix_alpha, (int, float))
                                               and 0 < self.mix_alpha < float("inf")):
            raise ValueError(f"DPOConfig.mix_alpha must be a finite number > 0 or None, got "
                             f"{self.mix_alpha}")
        if not 0.0 <= self.mix_none_prob < 1.0:
            raise ValueError(f"DPOConfig.mix_none_prob must be in [0, 1), got {self.mix_none_prob}")


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
    """One PMoL step's loss for a collated batch (data.collate_dpo); a batch holding "mix"
    (B, G), one mix per pair, takes mix_loss instead."""
    if batch.get("mix") is not None:
        return mix_loss(model, raw_model, batch, dpo, groups)
    B = batch["input_ids"].shape[0] // 2
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                output_router_logits=False)  # the router losses come from router_losses below
    policy = sequence_logps(out.logits, batch["input_ids"], batch["response_mask"])
    aux = router_losses(raw_model, batch["preference"], batch["attention_mask"], groups,
                        dpo.count_null_in_group)
    with torch.no_grad(), disable_adapters(raw_model):
        ref_out = raw_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        ref = sequence_logps(ref_out.logits, batch["input_ids"], batch["response_mask"])
    loss, margins = dpo_loss(policy[:B], policy[B:], ref[:B], ref[B:], dpo.beta, dpo.label_smoothing)
    metrics = {"loss": loss.item(), "dpo_acc": (margins > 0).float().mean().item(),
               "group": aux["group"].item(), "balance": aux["load_balance"].item()}
    if dpo.rpo_alpha > 0:
        chosen_tokens = batch["response_mask"][:B, 1:].sum().clamp_min(1)
        nll = -policy[:B].sum() / chosen_tokens
        loss = loss + dpo.rpo_alpha * nll
        metrics["nll"] = nll.item()
    return loss + aux["total"], metrics


def mix_loss(model: nn.Module, raw_model: nn.Module, batch: dict, dpo: DPOConfig,
             groups: list[str]):
    """The loss of a step over sampled mixes (module docstring): batch as collate_dpo gives
    it plus "mix" (B, G), pair i's lambda_i on the simplex (the routers of its chosen and
    rejected sequence both see it)."""
    B = batch["input_ids"].shape[0] // 2
    lam = batch["mix"].to(torch.float32)                          # (B, G)
    labels = batch["labels"].to(lam.device)                       # (B, G) in {1, -1, 0}
    with preference_mix(raw_model, lam.repeat(2, 1), name="batch mix"):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_router_logits=False)
    policy = sequence_logps(out.logits, batch["input_ids"], batch["response_mask"])
    no_group = torch.full_like(batch["preference"], -1)           # the mix, not the prompt, routes
    aux = router_losses(raw_model, no_group, batch["attention_mask"], groups, dpo.count_null_in_group)
    with torch.no_grad(), disable_adapters(raw_model):
        ref_out = raw_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        ref = sequence_logps(ref_out.logits, batch["input_ids"], batch["response_mask"])
    margins = dpo.beta * ((policy[:B] - ref[:B]) - (policy[B:] - ref[B:]))  # (B,)
    signed = labels.to(margins.dtype) * margins[:, None]     # (B, G)
    ls = dpo.label_smoothing
    per = -(1 - ls) * F.logsigmoid(signed) - ls * F.logsigmoid(-signed)
    weight = lam * labels.abs().to(lam.dtype)                     # (B, G)
    loss = (weight * per).sum() / B
    taught = labels != 0
    metrics = {"loss": loss.item(), "dpo_acc": ((signed > 0) & taught).sum().item()
               / max(1, int(taught.sum())), "balance": aux["load_balance"].item(), "group": 0.0}
    if dpo.rpo_alpha > 0:
        tokens = batch["response_mask"][:, 1:].sum(-1).clamp_min(1).to(policy.dtype)  # (2B,)
        per_token = -policy / tokens                              # NLL per token of each sequence
        nll_pref = torch.where(labels > 0, per_token[:B, None], per_token[B:, None])  # (B, G)
        nll = (weight * nll_pref).sum() / B
        loss = loss + dpo.rpo_alpha * nll
        metrics["nll"] = nll.item()
    return loss + aux["total"], metrics
