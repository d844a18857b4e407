"""moe_ext::lora_forward and moe_ext::lora_backward, the sparse grouped strategy: typed
wrapper, fake kernels, autograd through the registered backward op."""
from __future__ import annotations

import torch

from . import checks, fallback
from .common import acc_dtype, lib, register_no_derivative


def lora_sparse(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                weights: torch.Tensor, experts: torch.Tensor, scaling: float,
                num_null_experts: int = 0) -> torch.Tensor:
    """Sparse grouped strategy: y[t] = s * sum_k weights[t,k] * B_e A_e x[t], e = experts[t,k].

    x (T, D), lora_A (E, R, D), lora_B (E, O, R), weights (T, K) in acc dtype,
    experts (T, K) int64 in [0, E + num_null_experts). Returns y (T, O) in x's dtype.
    """
    y, _, _, _ = lib.lora_forward(x, lora_A, lora_B, weights, experts, float(scaling),
                                  int(num_null_experts))
    return y


@torch.library.register_fake("moe_ext::lora_forward")
def _lora_forward_fake(x, lora_A, lora_B, weights, experts, scaling, num_null_experts):
    checks.lora_forward_args(x, lora_A, lora_B, weights, experts, scaling, num_null_experts)
    T, K, E, R, O = x.shape[0], experts.shape[1], *lora_A.shape[:2], lora_B.shape[1]
    return (x.new_empty((T, O)), x.new_empty((T * K, R), dtype=acc_dtype(x.dtype)),
            experts.new_empty((T * K,)), experts.new_empty((E + 2,)))


@torch.library.register_fake("moe_ext::lora_backward")
def _lora_backward_fake(grad_y, x, lora_A, lora_B, weights, experts, order, offsets, h, scaling,
                        num_null_experts):
    checks.lora_backward_args(grad_y, x, lora_A, lora_B, weights, experts, order, offsets, h,
                              scaling, num_null_experts)
    # contiguous, as the kernels return them (empty_like would keep an input's strides)
    return (x.new_empty(x.shape), weights.new_empty(weights.shape),
            lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape))


def _setup(ctx, inputs, output):
    x, lora_A, lora_B, weights, experts, scaling, num_null_experts = inputs
    # h and the pairs' alignment (order, offsets) come from the forward: no second align.
    ctx.save_for_backward(x, lora_A, lora_B, weights, experts, *output[1:])
    ctx.mark_non_differentiable(output[1])  # h: saved for the backward, not a result
    ctx.scaling, ctx.num_null = scaling, num_null_experts


def _backward(ctx, grad_y, _grad_h, _grad_order, _grad_offsets):
    x, lora_A, lora_B, weights, experts, h, order, offsets = ctx.saved_tensors
    if grad_y is None:
        grad_y = x.new_zeros((x.shape[0], lora_B.shape[1]))
    if torch.is_grad_enabled():
        # create_graph=True: the gradient must itself be differentiable, so it comes from the
        # same math in PyTorch ops (fallback.py, the dense form) instead of the kernel.
        dx, dw, dA, dB = fallback.lora_backward(grad_y, x, lora_A, lora_B, weights, experts, None,
                                                None, h, ctx.scaling, ctx.num_null)
        return dx, dA, dB, dw, None, None, None
    dx, dw, dA, dB = lib.lora_backward(grad_y, x, lora_A, lora_B, weights, experts, order,
                                       offsets, h, ctx.scaling, ctx.num_null)
    return dx, dA, dB, dw, None, None, None


def pair_alignment(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_backward's order (P,) and offsets (E + 2,): the pairs sorted by expert with every
    null expert in one bin E, so that nothing grows with num_null_experts. lora_forward
    returns the same two as its last outputs."""
    return lib.align(experts.clamp(max=num_experts), num_experts + 1)


torch.library.register_autograd("moe_ext::lora_forward", _backward, setup_context=_setup)
register_no_derivative("lora_backward", "ops.lora_sparse or functional.molora")
