"""Pure-PyTorch reference of every moe_ext op: slow, simple, independent of the kernels.
Tests compare the kernels against these (in float64 where it matters); the CUDA fallbacks
(fallback.py) reuse the ones that need no host synchronisation.

Notation (docs/architecture.md#notation): T tokens, D/O in/out features, E LoRA experts,
N null experts, M = E + N, K experts per token, R LoRA rank, s = scaling.
"""
from __future__ import annotations

from typing import Optional

import torch


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def bin_counts(ids: torch.Tensor, num_bins: int) -> torch.Tensor:
    """(num_bins,) int64 occurrences of each id (a scatter-add: no host sync, unlike bincount)."""
    flat = ids.flatten()
    counts = torch.zeros(num_bins, dtype=torch.int64, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))


def route(router_logits: torch.Tensor, top_k: int, temperature: float = 1.0,
          logit_bias: Optional[torch.Tensor] = None, normalize_weights: bool = True):
    """router_logits (T, M) -> probs (T, M), weights (T, K), experts (T, K), counts (M,).
    Ties between equal probabilities pick the lower expert id (stable sort)."""
    # softmax((L + b) / tau) as softmax(((u - max u) / tau) * 2) with u = L/2 + b/2: halves
    # cannot overflow when added, and the max is taken out before dividing, so finite inputs
    # never give inf - inf = NaN.
    u = router_logits.to(_acc(router_logits.dtype)) / 2
    if logit_bias is not None:
        u = u + logit_bias.to(u.dtype) / 2
    probs = torch.softmax((u - u.amax(-1, keepdim=True)) / temperature * 2, dim=-1)
    experts = torch.sort(probs.detach(), dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = probs.gather(1, experts)
    if normalize_weights:
        weights = weights / weights.sum(-1, keepdim=True)
    return probs, weights, experts.contiguous(), bin_counts(experts, probs.shape[1])


def align(experts: torch.Tensor, num_bins: int):
    """experts (T, K) -> order (T*K,) stable-sorted by expert, offsets (num_bins + 1,)."""
    order = torch.sort(experts.flatten(), stable=True).indices
    counts = bin_counts(experts, num_bins)
    return order, torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


def gates(weights: torch.Tensor, experts: torch.Tensor, num_experts: int,
          num_null_experts: int) -> torch.Tensor:
    """(T, E): each token's routing weights scattered to their experts (summed if an id
    repeats). Null experts (and any id outside [0, E), as the CUDA kernels treat them) share
    one spare column that is dropped, so nothing grows with num_null_experts."""
    lora = (experts >= 0) & (experts < num_experts)
    idx = torch.where(lora, experts, torch.full_like(experts, num_experts))
    full = weights.new_zeros(experts.shape[0], num_experts + 1)
    return full.scatter_add(1, idx, weights)[:, :num_experts]


def lora_delta(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
               weights: torch.Tensor, experts: torch.Tensor, scaling: float) -> torch.Tensor:
    """y[t] = s * sum_k weights[t,k] * B_e A_e x[t] (e = experts[t,k]; e >= E adds nothing).
    x (T, D), lora_A (E, R, D), lora_B (E, O, R) -> (T, O), computed expert by expert."""
    E = lora_A.shape[0]
    y = x.new_zeros((x.shape[0], lora_B.shape[1]), dtype=weights.dtype)
    for e in range(E):
        gate = (weights * (experts == e)).sum(1)  # (T,)
        y = y + scaling * gate[:, None] * ((x.to(weights.dtype) @ lora_A[e].to(weights.dtype).T)
                                           @ lora_B[e].to(weights.dtype).T)
    return y.to(x.dtype)


def lora_dense(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
               weights: torch.Tensor, experts: torch.Tensor, scaling: float):
    """lora_dense_forward's outputs: y (T, O) = lora_delta and h_all (T, E*R) = x A_all^T."""
    E, R, D = lora_A.shape
    h_all = x.to(weights.dtype) @ lora_A.reshape(E * R, D).to(weights.dtype).T
    return lora_delta(x, lora_A, lora_B, weights, experts, scaling), h_all.to(x.dtype)


def lora_dense_expand(h_all: torch.Tensor, lora_B: torch.Tensor, weights: torch.Tensor,
                      experts: torch.Tensor, scaling: float) -> torch.Tensor:
    """lora_dense_expand's y (T, O) = s * sum_k weights[t,k] * B_e h_all[t, e*R:(e+1)*R]
    (e = experts[t,k]; e >= E adds nothing), expert by expert, in the weights' dtype."""
    E, _, R = lora_B.shape
    acc = weights.dtype
    y = h_all.new_zeros((h_all.shape[0], lora_B.shape[1]), dtype=acc)
    for e in range(E):
        gate = (weights * (experts == e)).sum(1)  # (T,)
        y = y + scaling * gate[:, None] * (h_all[:, e * R:(e + 1) * R].to(acc) @ lora_B[e].to(acc).T)
    return y.to(h_all.dtype)


def molora(x, router_logits, lora_A, lora_B, top_k, scaling, num_null_experts=0,
           normalize_weights=True, temperature=1.0, logit_bias=None) -> torch.Tensor:
    """The whole MoLoRA delta: x (..., D), router_logits (..., E + N) -> (..., O)."""
    D, O = x.shape[-1], lora_B.shape[1]
    _, weights, experts, _ = route(router_logits.reshape(-1, router_logits.shape[-1]), top_k,
                                   temperature, logit_bias, normalize_weights)
    y = lora_delta(x.reshape(-1, D), lora_A, lora_B, weights, experts, scaling)
    return y.reshape(*x.shape[:-1], O)
