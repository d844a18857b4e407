"""moe_ext::route (softmax with temperature and bias, top-K, renormalise, per-expert
counts) and moe_ext::route_backward: typed wrapper, fake kernels, autograd."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import checks, fallback
from .common import acc_dtype, lib, register_no_derivative


class Routing(NamedTuple):
    probs: torch.Tensor    # (T, M) softmax over all experts incl. null, acc dtype
    weights: torch.Tensor  # (T, K) gate of each chosen expert, acc dtype
    experts: torch.Tensor  # (T, K) int64 chosen expert ids, ids >= E are null experts
    counts: torch.Tensor   # (M,) int64 pairs per expert


def route(router_logits: torch.Tensor, top_k: int, temperature: float = 1.0,
          logit_bias: Optional[torch.Tensor] = None, normalize_weights: bool = True) -> Routing:
    """softmax((router_logits + logit_bias) / temperature) -> top-K -> renormalise.

    router_logits (T, M); logit_bias (M,) or None. Ties pick the lower expert id.
    Differentiable in router_logits and logit_bias through `probs` and `weights`.
    """
    return Routing(*lib.route(router_logits, logit_bias, int(top_k), float(temperature),
                              bool(normalize_weights)))


@torch.library.register_fake("moe_ext::route")
def _route_fake(router_logits, logit_bias, top_k, temperature, normalize_weights):
    checks.route_args(router_logits, logit_bias, top_k, temperature)
    T, M = router_logits.shape
    acc = acc_dtype(router_logits.dtype)
    return (router_logits.new_empty((T, M), dtype=acc),
            router_logits.new_empty((T, top_k), dtype=acc),
            router_logits.new_empty((T, top_k), dtype=torch.int64),
            router_logits.new_empty((M,), dtype=torch.int64))


@torch.library.register_fake("moe_ext::route_backward")
def _route_backward_fake(grad_probs, grad_weights, probs, weights, experts, temperature,
                         normalize_weights):
    checks.route_backward_args(grad_probs, grad_weights, probs, weights, experts, temperature)
    return torch.empty_like(probs)


def _setup(ctx, inputs, output):
    router_logits, logit_bias, _, temperature, normalize_weights = inputs
    probs, weights, experts, _ = output
    ctx.save_for_backward(probs, weights, experts)
    ctx.temperature, ctx.normalize = temperature, normalize_weights
    ctx.logits_dtype = router_logits.dtype
    ctx.bias_dtype = logit_bias.dtype if logit_bias is not None else None


def _backward(ctx, grad_probs, grad_weights, _grad_experts, _grad_counts):
    probs, weights, experts = ctx.saved_tensors
    if grad_weights is None:
        grad_weights = torch.zeros_like(weights)
    # Under create_graph=True the gradient must itself be differentiable: the same formula in
    # PyTorch ops (fallback.py), whose graph reaches the logits through the saved probs.
    backward = fallback.route_backward if torch.is_grad_enabled() else lib.route_backward
    g = backward(grad_probs, grad_weights, probs, weights, experts, ctx.temperature,
                 ctx.normalize)
    grad_bias = None
    if ctx.bias_dtype is not None and ctx.needs_input_grad[1]:
        grad_bias = g.sum(0).to(ctx.bias_dtype)  # z = (L + b) / tau: dL and db share dz
    return g.to(ctx.logits_dtype), grad_bias, None, None, None


torch.library.register_autograd("moe_ext::route", _backward, setup_context=_setup)
register_no_derivative("route_backward", "ops.route")
