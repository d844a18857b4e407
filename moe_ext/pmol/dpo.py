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

    sum_i sum_g w_ig DPO(l_ig * margin_i)  [+ rpo_alpha * the same weights on the NLL per
    token of the response group g prefers]  + load balance,   w_ig ~ lambda_ig |l_ig|

with l_ig the pair's label for group g (1, -1, 0: data.preference_labels; a single-label
row has 1 at its own group, so it is weighted by its own preference's lambda), w normalised
to a weighted mean. A share mix_none_prob of the pairs draws no mix instead: the prompt
routes them and they take the ordinary DPO + RPO (the two parts count equally, whatever
their shares), so the model still follows the prompt when no mix is given. Under a mix the
mix alone decides between the groups (MoLoRALinear.within_groups), and the group loss
trains, on every pair, the routing the prompt alone gives (molora.losses._prompt_routing).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from typing import Optional

from ..molora import MoLoRAConfig, disable_adapters
from ..molora.layer import mix_override
from ..molora.losses import router_losses


@dataclass
class DPOConfig:
    beta: float = 0.1
    label_smoothing: float = 0.0       # conservative DPO: assumed rate of flipped labels
    count_null_in_group: bool = False  # group loss: does the null expert count for every group
    rpo_alpha: float = 0.0             # weight of the NLL of the chosen responses (RPO)
    mix_alpha: Optional[float] = None  # Dirichlet concentration of the sampled mixes; None: no mixes
    mix_none_prob: float = 0.25        # share of pairs without a mix (when mix_alpha is set)

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


@torch.no_grad()
def reference_logps(raw_model: nn.Module, batch: dict) -> torch.Tensor:
    """(2B,) sequence log-probs of a collated batch under the reference: the same network
    with its adapters disabled (no mix: the reference never sees one)."""
    with disable_adapters(raw_model):
        out = raw_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return sequence_logps(out.logits, batch["input_ids"], batch["response_mask"])


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
    ref = reference_logps(raw_model, batch)
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
    rejected sequence both see it), or a row of zeros: no mix for that pair (the prompt
    routes it, and it takes the ordinary DPO + RPO); the group loss covers every pair."""
    lam = batch["mix"].to(torch.float32)                          # (B, G)
    labels = batch["labels"]                                      # (B, G) in {1, -1, 0}
    with mix_override(lam.repeat(2, 1)):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_router_logits=False)
    policy = sequence_logps(out.logits, batch["input_ids"], batch["response_mask"])
    # the group loss for every pair, on the routing its prompt alone gives (losses._prompt_routing)
    aux = router_losses(raw_model, batch["preference"], batch["attention_mask"], groups,
                        dpo.count_null_in_group)
    ref = reference_logps(raw_model, batch)
    loss, parts = mix_dpo_loss(policy, ref, lam, labels, batch["response_mask"], dpo.beta,
                               dpo.label_smoothing, dpo.rpo_alpha)
    metrics = {"loss": parts["dpo"], "dpo_acc": parts["dpo_acc"], "balance": aux["load_balance"].item(),
               "group": aux["group"].item(), "mixed": parts["mixed"]}
    if "nll" in parts:
        metrics["nll"] = parts["nll"]
    return loss + aux["total"], metrics


def mix_dpo_loss(policy: torch.Tensor, ref: torch.Tensor, lam: torch.Tensor, labels: torch.Tensor,
                 response_mask: torch.Tensor, beta: float, label_smoothing: float = 0.0,
                 rpo_alpha: float = 0.0):
    """The preference part of mix_loss (module docstring), shared with TRL's path
    (moe_ext.hf.trl_trainers.MoLoRADPOTrainer): policy and ref (2B,) sequence log-probs,
    the B chosen then the B rejected; lam (B, G) each pair's mix, a row of zeros for a pair
    without one (ordinary DPO); labels (B, G) in {1, -1, 0}; response_mask (2B, S), 1 on
    response tokens (for the NLL per token). Returns (loss, parts): the loss tensor (DPO +
    rpo_alpha * NLL, no router losses) and floats {"dpo", "dpo_acc", "mixed"[, "nll"]}."""
    B = lam.shape[0]
    lam = lam.to(torch.promote_types(policy.dtype, torch.float32))
    labels = labels.to(lam.device)
    mixed = lam.sum(-1) > 0                                       # (B,)
    margins = beta * ((policy[:B] - ref[:B]) - (policy[B:] - ref[B:]))  # (B,)
    # pairs without a mix: ordinary DPO, as weight 1 on label +1 of one column
    plain = torch.zeros_like(lam)
    plain[:, 0] = 1.0
    weight = torch.where(mixed[:, None], lam * labels.abs().to(lam.dtype), plain)  # (B, G)
    sign = torch.where(mixed[:, None], labels.to(lam.dtype), torch.ones_like(lam))
    signed = sign * margins[:, None]                              # (B, G)
    ls = label_smoothing
    per = -(1 - ls) * F.logsigmoid(signed) - ls * F.logsigmoid(-signed)
    total = _share_mean(weight, mixed)                            # (B, G) normalised weights
    loss = (total * per).sum()
    taught = weight > 0
    parts = {"dpo": loss.item(), "dpo_acc": ((signed > 0) & taught).sum().item()
             / max(1, int(taught.sum())), "mixed": mixed.float().mean().item()}
    if rpo_alpha > 0:
        tokens = response_mask[:, 1:].sum(-1).clamp_min(1).to(policy.dtype)  # (2B,)
        per_token = -policy / tokens                              # NLL per token of each sequence
        nll_pref = torch.where(sign > 0, per_token[:B, None], per_token[B:, None])  # (B, G)
        nll = (total * nll_pref).sum()
        loss = loss + rpo_alpha * nll
        parts["nll"] = nll.item()
    return loss, parts


def _share_mean(weight: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
    """weight (B, G) scaled so that the mixed pairs' part is their weighted mean and the
    others' part their plain mean, the two parts counting equally when the batch holds both:
    following the mix and following the prompt are two tasks of equal weight however the
    pairs are shared between them (mix_none_prob sets only how many pairs each gets; a
    smaller share weighted by its size left the prompt's routing undertrained)."""
    out = torch.zeros_like(weight)
    parts = [rows for rows in (mixed, ~mixed) if bool(rows.any()) and weight[rows].sum() > 0]
    for rows in parts:
        out[rows] = weight[rows] / weight[rows].sum() / len(parts)
    return out
