"""The GEMMs of MoLoRALinear that read the same x, with one dx between them.

MoLoRALinear reads x in its router (with the dense strategy: the router and every
expert's shrink, one GEMM) and in the base layer. Left to autograd, each GEMM's backward
writes its own dx (T, D) and autograd adds them in a separate pass (two reads, one write
of T x D). Here the projection hands out `x_base`, the x that the base GEMM reads; the
base's backward writes its dx into x_base's gradient, and the projection's backward adds
its own with one GEMM that reads it in the epilogue (addmm, beta = 1), so that pass is gone.

    out, x_base = project(x, weight)                  # out = x weight^T   (T, P)
    y = add_base_in_place(delta, x_base, W_t, bias)   # delta += x_base W_t + bias, in place

Both are plain PyTorch ops inside autograd Functions (so second derivatives work too);
MoLoRALinear uses them only without autocast and outside tracing / export.
"""
from __future__ import annotations

from typing import Optional

import torch


class _Project(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        ctx.set_materialize_grads(False)  # an unused x_base gets no zero gradient to add
        ctx.save_for_backward(x, weight)
        return x @ weight.T, x.view_as(x)

    @staticmethod
    def backward(ctx, grad_out, grad_x_base):
        x, weight = ctx.saved_tensors
        dx = dweight = None
        if ctx.needs_input_grad[0]:
            if grad_out is None:
                dx = grad_x_base
            elif grad_x_base is None:
                dx = grad_out @ weight
            else:  # the base's dx read in the GEMM's epilogue: no separate add
                dx = torch.addmm(grad_x_base, grad_out, weight)
        if ctx.needs_input_grad[1] and grad_out is not None:
            dweight = grad_out.T @ x
        return dx, dweight


class _AddBaseInPlace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, delta, x, weight_t, bias):
        ctx.save_for_backward(x, weight_t)
        ctx.has_bias = bias is not None
        delta.addmm_(x, weight_t)
        if bias is not None:
            delta.add_(bias)
        ctx.mark_dirty(delta)
        return delta

    @staticmethod
    def backward(ctx, grad_y):
        x, weight_t = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx = grad_y @ weight_t.T if need[1] else None
        dweight_t = x.T @ grad_y if need[2] else None
        dbias = grad_y.sum(0) if need[3] and ctx.has_bias else None
        return grad_y, dx, dweight_t, dbias


def project(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, D), weight (P, D) -> (x weight^T (T, P), x_base): x_base is x (a view) for the
    base GEMM, whose dx this GEMM's backward then accumulates into."""
    return _Project.apply(x, weight)


def add_base_in_place(delta: torch.Tensor, x: torch.Tensor, weight_t: torch.Tensor,
                      bias: Optional[torch.Tensor]) -> torch.Tensor:
    """delta (T, O) += x (T, D) weight_t (D, O) (+ bias (O,)), in place, one GEMM reading
    delta in its epilogue (beta = 1); returns delta. x may be `project`'s x_base."""
    return _AddBaseInPlace.apply(delta, x, weight_t, bias)
