"""Typed wrappers around the moe_ext custom ops, their fake (meta) kernels for
torch.compile / export, and their autograd, which calls the registered backward ops.

Notation (DESIGN.md): T tokens, D/O in/out features, E LoRA experts, N null experts,
M = E + N router outputs, K experts per token, R LoRA rank, P = T * K pairs.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import _C  # noqa: F401  (loading the library registers the ops)

_ops = torch.ops.moe_ext


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the kernels: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    return Routing(*_ops.route(router_logits, logit_bias, int(top_k), float(temperature),
                               bool(normalize_weights)))


def align(experts: torch.Tensor, num_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable counting sort of the P = T*K flattened pairs by expert id.

    Returns order (P,) int64 (pair indices grouped by expert, token order kept inside an
    expert) and offsets (num_bins + 1,) int64 with offsets[b+1] - offsets[b] = count of b.
    """
    return _ops.align(experts, int(num_bins))


def lora_sparse(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                weights: torch.Tensor, experts: torch.Tensor, scaling: float,
                num_null_experts: int = 0) -> torch.Tensor:
    """Sparse grouped strategy: y[t] = s * sum_k weights[t,k] * B_e A_e x[t], e = experts[t,k].

    x (T, D), lora_A (E, R, D), lora_B (E, O, R), weights (T, K) in acc dtype,
    experts (T, K) int64 in [0, E + num_null_experts). Returns y (T, O) in x's dtype.
    """
    y, _ = _ops.lora_forward(x, lora_A, lora_B, weights, experts, float(scaling),
                             int(num_null_experts))
    return y


def gate_dense(h_all: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
               num_experts: int, num_null_experts: int, scaling: float) -> torch.Tensor:
    """Dense-gated strategy's mask: h_all (T, E*R) -> gated (T, E*R) where each chosen LoRA
    expert's R columns are scaled by s * weight and all other columns are zero."""
    return _ops.gate_dense(h_all, weights, experts, int(num_experts), int(num_null_experts),
                           float(scaling))


# ---------------------------------------------------------------- fake kernels
@torch.library.register_fake("moe_ext::route")
def _route_fake(router_logits, logit_bias, top_k, temperature, normalize_weights):
    T, M = router_logits.shape
    acc = acc_dtype(router_logits.dtype)
    return (router_logits.new_empty((T, M), dtype=acc),
            router_logits.new_empty((T, top_k), dtype=acc),
            router_logits.new_empty((T, top_k), dtype=torch.int64),
            router_logits.new_empty((M,), dtype=torch.int64))


@torch.library.register_fake("moe_ext::route_backward")
def _route_backward_fake(grad_probs, grad_weights, probs, weights, experts, temperature,
                         normalize_weights):
    return torch.empty_like(probs)


@torch.library.register_fake("moe_ext::align")
def _align_fake(experts, num_bins):
    return (experts.new_empty((experts.numel(),), dtype=torch.int64),
            experts.new_empty((num_bins + 1,), dtype=torch.int64))


@torch.library.register_fake("moe_ext::lora_forward")
def _lora_forward_fake(x, lora_A, lora_B, weights, experts, scaling, num_null_experts):
    T, K, R, O = x.shape[0], experts.shape[1], lora_A.shape[1], lora_B.shape[1]
    return x.new_empty((T, O)), x.new_empty((T * K, R), dtype=acc_dtype(x.dtype))


@torch.library.register_fake("moe_ext::lora_backward")
def _lora_backward_fake(grad_y, x, lora_A, lora_B, weights, experts, order, offsets, h, scaling,
                        num_null_experts):
    return (torch.empty_like(x), torch.empty_like(weights), torch.empty_like(lora_A),
            torch.empty_like(lora_B))


@torch.library.register_fake("moe_ext::gate_dense")
def _gate_dense_fake(h_all, weights, experts, num_experts, num_null_experts, scaling):
    return torch.empty_like(h_all)


@torch.library.register_fake("moe_ext::gate_dense_backward")
def _gate_dense_backward_fake(grad_gated, h_all, weights, experts, num_experts, num_null_experts,
                              scaling):
    return torch.empty_like(h_all), torch.empty_like(weights)


# ---------------------------------------------------------------- autograd
def _route_setup(ctx, inputs, output):
    router_logits, logit_bias, _, temperature, normalize_weights = inputs
    probs, weights, experts, _ = output
    ctx.save_for_backward(probs, weights, experts)
    ctx.temperature, ctx.normalize = temperature, normalize_weights
    ctx.logits_dtype = router_logits.dtype
    ctx.bias_dtype = logit_bias.dtype if logit_bias is not None else None


def _route_backward(ctx, grad_probs, grad_weights, _grad_experts, _grad_counts):
    probs, weights, experts = ctx.saved_tensors
    if grad_weights is None:
        grad_weights = torch.zeros_like(weights)
    g = _ops.route_backward(grad_probs, grad_weights, probs, weights, experts, ctx.temperature,
                            ctx.normalize)
    grad_bias = None
    if ctx.bias_dtype is not None and ctx.needs_input_grad[1]:
        grad_bias = g.sum(0).to(ctx.bias_dtype)  # z = (L + b) / tau: dL and db share dz
    return g.to(ctx.logits_dtype), grad_bias, None, None, None


torch.library.register_autograd("moe_ext::route", _route_backward, setup_context=_route_setup)


def _lora_setup(ctx, inputs, output):
    x, lora_A, lora_B, weights, experts, scaling, num_null_experts = inputs
    ctx.save_for_backward(x, lora_A, lora_B, weights, experts, output[1])
    ctx.scaling, ctx.num_null = scaling, num_null_experts


def _lora_backward(ctx, grad_y, _grad_h):
    x, lora_A, lora_B, weights, experts, h = ctx.saved_tensors
    if grad_y is None:
        grad_y = x.new_zeros((x.shape[0], lora_B.shape[1]))
    order, offsets = _ops.align(experts, lora_A.shape[0] + ctx.num_null)
    dx, dw, dA, dB = _ops.lora_backward(grad_y, x, lora_A, lora_B, weights, experts, order,
                                        offsets, h, ctx.scaling, ctx.num_null)
    return dx, dA, dB, dw, None, None, None


torch.library.register_autograd("moe_ext::lora_forward", _lora_backward, setup_context=_lora_setup)


def _gate_setup(ctx, inputs, output):
    h_all, weights, experts, num_experts, num_null_experts, scaling = inputs
    ctx.save_for_backward(h_all, weights, experts)
    ctx.args = (num_experts, num_null_experts, scaling)


def _gate_backward(ctx, grad_gated):
    h_all, weights, experts = ctx.saved_tensors
    dh, dw = _ops.gate_dense_backward(grad_gated, h_all, weights, experts, *ctx.args)
    return dh, dw, None, None, None, None


torch.library.register_autograd("moe_ext::gate_dense", _gate_backward, setup_context=_gate_setup)
