"""PyTorch kernels of every moe_ext op, registered for CUDA tensors only where the
extension was built without a CUDA kernel, so MoLoRA layers, training and export work on
a GPU (at PyTorch speed, not kernel speed). `moe-ext info` reports them as fallbacks.

Same contracts as the C++ kernels (csrc/ops.cpp), no host synchronisation. route and align
are the references (reference.py); both LoRA op families use the dense-gated form:
all experts' shrink as one GEMM, the routing weights scattered into a (T, E) gate matrix,
one GEMM for the expand. The registered ops check sizes, dtypes and devices as the kernels
do (checks.py); non-finite router logits and out-of-range ids to align are only checked when
MOE_EXT_DEBUG=1 (the check costs a host sync), and otherwise bad ids act as null experts /
the last bin, as in the CUDA kernels: no index ever leaves its tensor.
"""
from __future__ import annotations

import os

import torch

from . import checks, reference
from .common import acc_dtype

REGISTERED: list[str] = []


def route(router_logits, logit_bias, top_k, temperature, normalize_weights):
    if os.environ.get("MOE_EXT_DEBUG") == "1" and not torch.isfinite(router_logits).all():
        raise ValueError("router_logits contains non-finite values (NaN or Inf)")
    probs, weights, experts, counts = reference.route(router_logits, top_k, temperature,
                                                      logit_bias, normalize_weights)
    return probs, weights.contiguous(), experts, counts


def route_backward(grad_probs, grad_weights, probs, weights, experts, temperature,
                   normalize_weights):
    """Differentiable (the forward ops' backward under create_graph=True uses it). Ids outside
    [0, M) add nothing, as in the CUDA kernel."""
    g = grad_probs.to(probs.dtype).clone() if grad_probs is not None else torch.zeros_like(probs)
    gw = grad_weights.to(probs.dtype)
    valid = (experts >= 0) & (experts < probs.shape[1])
    idx = torch.where(valid, experts, torch.zeros_like(experts))
    if normalize_weights:
        S = (probs.gather(1, idx) * valid).sum(-1, keepdim=True)
        dot = (gw * weights.to(probs.dtype)).sum(-1, keepdim=True)
        g.scatter_add_(1, idx, (gw - dot) / S * valid)
    else:
        g.scatter_add_(1, idx, gw * valid)
    return probs * (g - (probs * g).sum(-1, keepdim=True)) / temperature


def align(experts, num_bins):
    """reference.align with ids outside [0, num_bins) counted in the last bin (CUDA's rule)."""
    valid = (experts >= 0) & (experts < num_bins)
    if os.environ.get("MOE_EXT_DEBUG") == "1" and not valid.all():
        raise ValueError(f"experts holds an id outside [0, {num_bins})")
    return reference.align(torch.where(valid, experts, num_bins - 1), num_bins)


def _shrink_all(x, lora_A):
    E, R, D = lora_A.shape
    acc = acc_dtype(x.dtype)
    return (x.to(acc) @ lora_A.reshape(E * R, D).to(acc).T).view(-1, E, R)  # (T, E, R)


def _chosen(values, experts, E):
    """values (T, E, ...) gathered at each pair's expert, zero for null experts: (T, K, ...)."""
    is_lora = (experts >= 0) & (experts < E)
    idx = torch.where(is_lora, experts, torch.zeros_like(experts))
    idx = idx.view(*idx.shape, *([1] * (values.dim() - 2))).expand(-1, -1, *values.shape[2:])
    mask = is_lora.view(*is_lora.shape, *([1] * (values.dim() - 2)))
    return values.gather(1, idx) * mask


def _dense_forward(x, lora_A, lora_B, weights, experts, scaling, num_null_experts):
    """y (T, O) in x's dtype and h_all (T, E, R) in acc: all experts' shrink, masked, expanded."""
    E, R, _ = lora_A.shape
    h_all = _shrink_all(x, lora_A)
    gated = (h_all * (scaling * reference.gates(weights, experts, E, num_null_experts))[:, :, None])
    y = gated.reshape(-1, E * R) @ lora_B.permute(0, 2, 1).reshape(E * R, -1).to(gated.dtype)
    return y.to(x.dtype), h_all


def lora_forward(x, lora_A, lora_B, weights, experts, scaling, num_null_experts):
    y, h_all = _dense_forward(x, lora_A, lora_B, weights, experts, scaling, num_null_experts)
    E, R, _ = lora_A.shape
    order, offsets = align(experts.clamp(max=E), E + 1)  # ops.pair_alignment
    return y, _chosen(h_all, experts, E).reshape(-1, R).contiguous(), order, offsets


def lora_backward(grad_y, x, lora_A, lora_B, weights, experts, order, offsets, h, scaling,
                  num_null_experts):
    E, R, D = lora_A.shape
    acc = acc_dtype(x.dtype)
    h_all = _shrink_all(x, lora_A)
    gates = scaling * reference.gates(weights, experts, E, num_null_experts)  # (T, E)
    b_flat = lora_B.permute(0, 2, 1).reshape(E * R, -1).to(acc)             # (E*R, O)
    dy = grad_y.to(acc)
    dz = (dy @ b_flat.T).view(-1, E, R)                                      # d(gated)
    gated = (h_all * gates[:, :, None]).reshape(-1, E * R)
    dB = (gated.T @ dy).view(E, R, -1).permute(0, 2, 1)                      # (E, O, R)
    dh = (dz * gates[:, :, None]).reshape(-1, E * R)
    dw = _chosen(scaling * (dz * h_all).sum(-1), experts, E)
    dx = dh @ lora_A.reshape(E * R, D).to(acc)
    dA = (dh.T @ x.to(acc)).view(E, R, D)
    return (dx.to(x.dtype), dw.to(weights.dtype), dA.to(lora_A.dtype).contiguous(),
            dB.to(lora_B.dtype).contiguous())


def lora_dense_forward(x, lora_A, lora_B, weights, experts, scaling, num_null_experts):
    """(y, h_all): the dense-gated form of lora_forward, h_all (T, E*R) in x's dtype."""
    y, h_all = _dense_forward(x, lora_A, lora_B, weights, experts, scaling, num_null_experts)
    E, R, _ = lora_A.shape
    return y, h_all.reshape(h_all.shape[0], E * R).to(x.dtype)  # E * R, not -1: T may be 0


def lora_dense_backward(grad_y, x, lora_A, lora_B, weights, experts, h_all, scaling,
                        num_null_experts):
    """Differentiable (the forward op's backward under create_graph=True uses it); h_all is
    recomputed from x so that second derivatives reach x."""
    return lora_backward(grad_y, x, lora_A, lora_B, weights, experts, None, None, h_all, scaling,
                         num_null_experts)


def lora_dense_expand(h_all, lora_B, weights, experts, scaling, num_null_experts):
    """y (T, O) = s * gate(h_all) B_all^T in h_all's dtype (the GEMM in acc)."""
    E, O, R = lora_B.shape
    acc = acc_dtype(h_all.dtype)
    gates = scaling * reference.gates(weights, experts, E, num_null_experts)  # (T, E)
    gated = (h_all.to(acc).view(-1, E, R) * gates[:, :, None]).reshape(-1, E * R)
    return (gated @ lora_B.permute(0, 2, 1).reshape(E * R, O).to(acc)).to(h_all.dtype)


def lora_dense_expand_backward(grad_y, h_all, lora_B, weights, experts, scaling,
                               num_null_experts):
    """(grad_h_all, grad_weights, grad_B), differentiable (create_graph=True uses it)."""
    E, O, R = lora_B.shape
    acc = acc_dtype(h_all.dtype)
    gates = scaling * reference.gates(weights, experts, E, num_null_experts)  # (T, E)
    h = h_all.to(acc).view(-1, E, R)
    dy = grad_y.to(h_all.dtype).to(acc)
    dz = (dy @ lora_B.permute(0, 2, 1).reshape(E * R, O).to(acc).T).view(-1, E, R)  # d(gated)
    dh = (dz * gates[:, :, None]).reshape(-1, E * R)
    dw = _chosen(scaling * (dz * h).sum(-1), experts, E)
    dB = (dy.T @ (h * gates[:, :, None]).reshape(-1, E * R)).view(O, E, R).permute(1, 0, 2)
    return dh.to(h_all.dtype), dw.to(weights.dtype), dB.to(lora_B.dtype).contiguous()


def _checked(fn, check):
    """fn behind the argument checks of the fake kernels (checks.py)."""
    def op(*args):
        check(*args)
        return fn(*args)
    return op


OPS = {
    "route": _checked(route, lambda L, b, k, tau, _: checks.route_args(L, b, k, tau)),
    "route_backward": _checked(route_backward, lambda gp, gw, p, w, e, tau, _:
                               checks.route_backward_args(gp, gw, p, w, e, tau)),
    "align": _checked(align, checks.align_args),
    "lora_forward": _checked(lora_forward, checks.lora_forward_args),
    "lora_backward": _checked(lora_backward, checks.lora_backward_args),
    "lora_dense_forward": _checked(lora_dense_forward, checks.lora_forward_args),
    "lora_dense_backward": _checked(lora_dense_backward, checks.lora_dense_backward_args),
    "lora_dense_expand": _checked(lora_dense_expand, checks.lora_dense_expand_args),
    "lora_dense_expand_backward": _checked(lora_dense_expand_backward,
                                           checks.lora_dense_expand_backward_args),
}


def register_cuda_fallbacks() -> None:
    """Registers each op above for CUDA unless the extension has a CUDA kernel for it."""
    for name, fn in OPS.items():
        if name in REGISTERED:
            continue
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"moe_ext::{name}", "CUDA"):
            torch.library.register_kernel(f"moe_ext::{name}", "cuda", fn)
            REGISTERED.append(name)
