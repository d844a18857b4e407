"""moe_ext::gate_dense and moe_ext::gate_dense_backward, the dense-gated strategy's mask:
typed wrapper, fake kernels, autograd through the registered backward op."""
from __future__ import annotations

import torch

from . import checks, fallback
from .common import lib, register_no_derivative


def gate_dense(h_all: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
               num_experts: int, num_null_experts: int, scaling: float) -> torch.Tensor:
    """Dense-gated strategy's mask: h_all (T, E*R) -> gated (T, E*R) where each chosen LoRA
    expert's R columns are scaled by s * weight and all other columns are zero."""
    return lib.gate_dense(h_all, weights, experts, int(num_experts), int(num_null_experts),
                          float(scaling))


@torch.library.register_fake("moe_ext::gate_dense")
def _gate_dense_fake(h_all, weights, experts, num_experts, num_null_experts, scaling):
    checks.gate_dense_args(h_all, weights, experts, num_experts, num_null_experts, scaling)
    return torch.empty_like(h_all)


@torch.library.register_fake("moe_ext::gate_dense_backward")
def _gate_dense_backward_fake(grad_gated, h_all, weights, experts, num_experts, num_null_experts,
                              scaling):
    checks.gate_dense_args(h_all, weights, experts, num_experts, num_null_experts, scaling,
                           grad_gated)
    return torch.empty_like(h_all), torch.empty_like(weights)


def _setup(ctx, inputs, output):
    h_all, weights, experts, num_experts, num_null_experts, scaling = inputs
    ctx.save_for_backward(h_all, weights, experts)
    ctx.args = (num_experts, num_null_experts, scaling)


def _backward(ctx, grad_gated):
    h_all, weights, experts = ctx.saved_tensors
    # create_graph=True: the differentiable PyTorch formula (fallback.py) instead of the kernel.
    backward = fallback.gate_dense_backward if torch.is_grad_enabled() else lib.gate_dense_backward
    dh, dw = backward(grad_gated, h_all, weights, experts, *ctx.args)
    return dh, dw, None, None, None, None


torch.library.register_autograd("moe_ext::gate_dense", _backward, setup_context=_setup)
register_no_derivative("gate_dense_backward", "ops.gate_dense or functional.molora")
