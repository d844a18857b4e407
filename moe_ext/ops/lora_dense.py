"""moe_ext::lora_dense_forward and moe_ext::lora_dense_backward, the dense-gated strategy, and
moe_ext::lora_dense_expand(_backward), its expand alone from a given h_all: typed wrappers,
fake kernels, autograd through the registered backward ops."""
from __future__ import annotations

import torch

from . import checks, fallback
from .common import lib, register_no_derivative


def lora_dense(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
               weights: torch.Tensor, experts: torch.Tensor, scaling: float,
               num_null_experts: int = 0) -> torch.Tensor:
    """Dense-gated strategy: y[t] = s * sum_k weights[t,k] * B_e A_e x[t], e = experts[t,k],
    computed as gate(x A_all^T) B_all^T: every expert's shrink, the unchosen ones masked.

    x (T, D), lora_A (E, R, D), lora_B (E, O, R), weights (T, K) in acc dtype,
    experts (T, K) int64 in [0, E + num_null_experts). Returns y (T, O) in x's dtype.
    """
    y, _ = lib.lora_dense_forward(x, lora_A, lora_B, weights, experts, float(scaling),
                                  int(num_null_experts))
    return y


@torch.library.register_fake("moe_ext::lora_dense_forward")
def _lora_dense_forward_fake(x, lora_A, lora_B, weights, experts, scaling, num_null_experts):
    checks.lora_forward_args(x, lora_A, lora_B, weights, experts, scaling, num_null_experts)
    T, E, R, O = x.shape[0], lora_A.shape[0], lora_A.shape[1], lora_B.shape[1]
    return x.new_empty((T, O)), x.new_empty((T, E * R))


@torch.library.register_fake("moe_ext::lora_dense_backward")
def _lora_dense_backward_fake(grad_y, x, lora_A, lora_B, weights, experts, h_all, scaling,
                              num_null_experts):
    checks.lora_dense_backward_args(grad_y, x, lora_A, lora_B, weights, experts, h_all, scaling,
                                    num_null_experts)
    # contiguous, as the kernels return them (empty_like would keep an input's strides)
    return (x.new_empty(x.shape), weights.new_empty(weights.shape),
            lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape))


def _setup(ctx, inputs, output):
    x, lora_A, lora_B, weights, experts, scaling, num_null_experts = inputs
    ctx.save_for_backward(x, lora_A, lora_B, weights, experts, output[1])
    ctx.mark_non_differentiable(output[1])  # h_all: saved for the backward, not a result
    ctx.scaling, ctx.num_null = scaling, num_null_experts


def _backward(ctx, grad_y, _grad_h_all):
    x, lora_A, lora_B, weights, experts, h_all = ctx.saved_tensors
    if grad_y is None:
        grad_y = x.new_zeros((x.shape[0], lora_B.shape[1]))
    # create_graph=True: the differentiable PyTorch formula (fallback.py) instead of the kernel.
    backward = fallback.lora_dense_backward if torch.is_grad_enabled() else lib.lora_dense_backward
    dx, dw, dA, dB = backward(grad_y, x, lora_A, lora_B, weights, experts, h_all, ctx.scaling,
                              ctx.num_null)
    return dx, dA, dB, dw, None, None, None


torch.library.register_autograd("moe_ext::lora_dense_forward", _backward, setup_context=_setup)
register_no_derivative("lora_dense_backward", "ops.lora_dense or functional.molora")


def lora_dense_expand(h_all: torch.Tensor, lora_B: torch.Tensor, weights: torch.Tensor,
                      experts: torch.Tensor, scaling: float, num_null_experts: int = 0) -> torch.Tensor:
    """The dense-gated expand from a given shrink: y[t] = s * sum_k weights[t,k] * B_e h_e[t]
    with h_e[t] = h_all[t, e*R:(e+1)*R], e = experts[t,k] (null experts add nothing).

    h_all (T, E*R) = x A_all^T, lora_B (E, O, R) in h_all's dtype, weights (T, K) in acc dtype,
    experts (T, K) int64. Returns y (T, O) in h_all's dtype; differentiable in h_all, lora_B
    and weights. MoLoRALinear computes h_all with its router logits in one GEMM over x.
    """
    return lib.lora_dense_expand(h_all, lora_B, weights, experts, float(scaling),
                                 int(num_null_experts))


@torch.library.register_fake("moe_ext::lora_dense_expand")
def _lora_dense_expand_fake(h_all, lora_B, weights, experts, scaling, num_null_experts):
    checks.lora_dense_expand_args(h_all, lora_B, weights, experts, scaling, num_null_experts)
    return h_all.new_empty((h_all.shape[0], lora_B.shape[1]))


@torch.library.register_fake("moe_ext::lora_dense_expand_backward")
def _lora_dense_expand_backward_fake(grad_y, h_all, lora_B, weights, experts, scaling,
                                     num_null_experts):
    checks.lora_dense_expand_backward_args(grad_y, h_all, lora_B, weights, experts, scaling,
                                           num_null_experts)
    return (h_all.new_empty(h_all.shape), weights.new_empty(weights.shape),
            lora_B.new_empty(lora_B.shape))


def _expand_setup(ctx, inputs, output):
    h_all, lora_B, weights, experts, scaling, num_null_experts = inputs
    ctx.save_for_backward(h_all, lora_B, weights, experts)
    ctx.scaling, ctx.num_null = scaling, num_null_experts


def _expand_backward(ctx, grad_y):
    h_all, lora_B, weights, experts = ctx.saved_tensors
    backward = (fallback.lora_dense_expand_backward if torch.is_grad_enabled()
                else lib.lora_dense_expand_backward)
    dh, dw, dB = backward(grad_y, h_all, lora_B, weights, experts, ctx.scaling, ctx.num_null)
    return dh, dB, dw, None, None, None


torch.library.register_autograd("moe_ext::lora_dense_expand", _expand_backward,
                                setup_context=_expand_setup)
register_no_derivative("lora_dense_expand_backward", "ops.lora_dense_expand")
