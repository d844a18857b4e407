"""Router losses for MoLoRA models: Switch-style load balance, router z-loss, and PMoL's
expert-group soft loss. Each takes one layer's routing; `router_losses` averages them over
all MoLoRA layers of a model and applies the config's coefficients.

Shapes: probs (T, M) with M = E + N, experts (T, K), logits (T, M), token_mask (T,) bool.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from .config import MoLoRAConfig
from .layer import molora_layers


def _masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return values.mean(0)
    m = mask.to(values.dtype).reshape(-1, *([1] * (values.dim() - 1)))
    return (values * m).sum(0) / m.sum().clamp_min(1.0)


def load_balance_loss(probs: torch.Tensor, experts: torch.Tensor,
                      token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch Transformer: M * sum_i f_i * P_i, f_i = share of the (token, k) pairs sent to
    expert i (no gradient), P_i = mean router probability of i. 1.0 when perfectly even."""
    M = probs.shape[1]
    chosen = torch.zeros_like(probs).scatter_(1, experts, 1.0) / experts.shape[1]
    f = _masked_mean(chosen, token_mask).detach()
    P = _masked_mean(probs, token_mask)
    return M * (f * P).sum()


def router_z_loss(logits: torch.Tensor, token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ST-MoE: mean over tokens of logsumexp(logits)^2; keeps router logits small."""
    z = torch.logsumexp(logits.float(), dim=-1).square()
    return _masked_mean(z, token_mask)


def group_soft_loss(probs: torch.Tensor, preference: torch.Tensor, group_masks: torch.Tensor,
                    token_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """PMoL expert-group soft loss: -log(router mass on the token's preference group).

    preference (T,) int64 preference index per token (-1: no label, ignored);
    group_masks (G, M) bool, which experts belong to each group.
    """
    labelled = preference >= 0
    if token_mask is not None:
        labelled = labelled & token_mask.bool()
    if not bool(labelled.any()):
        return probs.sum() * 0.0
    mass = (probs * group_masks[preference.clamp_min(0)].to(probs.dtype)).sum(-1)
    return -(torch.log(mass.clamp_min(1e-9)))[labelled].mean()


def group_masks(config: MoLoRAConfig, groups: list[str], count_null: bool = False,
                device=None) -> torch.Tensor:
    """(G, E + N) bool: row g marks the experts of groups[g] (plus the null experts when
    count_null: falling back to the base then counts toward every preference)."""
    M = config.num_experts + config.num_null_experts
    masks = torch.zeros(len(groups), M, dtype=torch.bool, device=device)
    for g, name in enumerate(groups):
        if name not in config.expert_groups:
            raise ValueError(f"unknown preference group {name!r}; config.expert_groups has "
                             f"{sorted(config.expert_groups)}")
        masks[g, list(config.expert_groups[name])] = True
        if count_null:
            masks[g, config.num_experts:] = True
    return masks


class RouterLossGradientWarning(UserWarning):
    """Router losses computed from a routing without autograd graph while training (reentrant
    gradient checkpointing): their value is right, but they train nothing."""


def _warn_if_graphless(model: nn.Module, layers: list) -> None:
    """Warns (once per model) when grad is on but a trained router's last routing has no
    graph: torch.utils.checkpoint(use_reentrant=True) runs the forward under no_grad and
    its backward re-runs it, but the router losses were already taken from the first
    forward's probs, so their gradients are silently lost (the experts and the main loss's
    path through the gate weights still train)."""
    if not torch.is_grad_enabled() or getattr(model, "_molora_graphless_warned", False):
        return
    lost = [layer for layer in layers if layer.router.weight.requires_grad
            and not layer.last_routing.probs.requires_grad]
    if lost:
        model._molora_graphless_warned = True
        warnings.warn(
            f"{len(lost)} MoLoRA layers routed without autograd graph while gradients are on "
            f"(reentrant gradient checkpointing, use_reentrant=True): the router losses "
            f"(aux_loss) give their routers no gradient. Checkpoint with use_reentrant=False "
            f"(transformers: activation_checkpointing_kwargs or gradient_checkpointing_kwargs="
            f"{{'use_reentrant': False}}, on the model or in TrainingArguments); see "
            f"docs/guide-hf.md", RouterLossGradientWarning, stacklevel=3)


def _prompt_routing(r, config: MoLoRAConfig) -> torch.Tensor:
    """The routing probabilities the group loss trains: the layer's own, or for a steerable
    config the routing the prompt alone gives (softmax of the router logits before any bias
    or mix), so that every pair, whether a mix routed it or not, teaches the router to read
    the preference from the prompt (what routes it when no mix is given)."""
    if not config.steerable:
        return r.probs
    return torch.softmax(r.logits.float() / config.router_temperature, dim=-1)


def router_losses(model: nn.Module, preference: Optional[torch.Tensor] = None,
                  token_mask: Optional[torch.Tensor] = None, groups: Optional[list[str]] = None,
                  count_null_in_group: bool = False) -> dict[str, torch.Tensor]:
    """Averages over the model's MoLoRA layers (their last forward) and weighs by the config:
    returns {"load_balance", "z_loss", "group", "total"}; total = sum of coef * loss.

    preference: (B,) preference index per example (into `groups`, default the config's
    group order), broadcast to the example's tokens; token_mask: (B, S) attention mask.
    Warns (RouterLossGradientWarning) when gradients are on but the routing has no graph
    (reentrant gradient checkpointing): such losses train nothing.
    """
    config: MoLoRAConfig = model.molora_config
    layers = [m for m in molora_layers(model).values() if m.last_routing is not None]
    if not layers:
        raise ValueError("no MoLoRA layer has routed anything yet: run a forward pass first")
    _warn_if_graphless(model, layers)
    device = layers[0].last_routing.probs.device
    mask = token_mask.reshape(-1).bool() if token_mask is not None else None
    groups = groups if groups is not None else list(config.expert_groups)
    token_pref = None
    if preference is not None and groups:
        per_token = layers[0].last_routing.probs.shape[0] // preference.shape[0]
        token_pref = preference.to(device).repeat_interleave(per_token)
        masks = group_masks(config, groups, count_null_in_group, device)
    zero = torch.zeros((), device=device)
    lb, zl, gl = zero, zero, zero
    for layer in layers:
        r = layer.last_routing
        lb = lb + load_balance_loss(r.probs, r.experts, mask)
        zl = zl + router_z_loss(r.logits, mask)
        if token_pref is not None:
            gl = gl + group_soft_loss(_prompt_routing(r, config), token_pref, masks, mask)
    n = len(layers)
    out = {"load_balance": lb / n, "z_loss": zl / n, "group": gl / n}
    out["total"] = (config.router_aux_loss_coef * out["load_balance"]
                    + config.router_z_loss_coef * out["z_loss"]
                    + config.group_loss_coef * out["group"])
    return out
