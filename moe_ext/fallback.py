"""PyTorch implementations of every moe_ext op, registered for CUDA tensors while the
extension has no CUDA kernels, so MoLoRA layers, training and export work on a GPU today
(at PyTorch speed, not kernel speed). `moe-ext info` reports them as fallbacks.

Same contracts as the C++ kernels (csrc/ops.cpp). The LoRA ops use the dense-gated form:
all experts' shrink as one GEMM, the routing weights scattered into a (T, E) gate matrix,
one GEMM for the expand; exact, with no host synchronisation. Non-finite router logits
are only checked when MOE_EXT_DEBUG=1 (the check costs a host sync).
"""
from __future__ import annotations

import os

import torch

from .ops import acc_dtype

REGISTERED: list[str] = []


def _gates(weights, experts, num_experts: int, num_null_experts: int) -> torch.Tensor:
    """(T, E) weights scattered to their experts (summed if repeated), null columns dropped."""
    T = experts.shape[0]
    full = weights.new_zeros(T, num_experts + num_null_experts)
    return full.scatter_add(1, experts, weights)[:, :num_experts]


def route(router_logits, logit_bias, top_k, temperature, normalize_weights):
    acc = acc_dtype(router_logits.dtype)
    if os.environ.get("MOE_EXT_DEBUG") == "1" and not torch.isfinite(router_logits).all():
        raise ValueError("router_logits contains non-finite values (NaN or Inf)")
    z = router_logits.to(acc)
    if logit_bias is not None:
        z = z + logit_bias.to(acc)
    probs = torch.softmax(z / temperature, dim=-1)
    experts = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :top_k].contiguous()
    weights = probs.gather(1, experts)
    if normalize_weights:
        weights = weights / weights.sum(-1, keepdim=True)
    counts = torch.zeros(probs.shape[1], dtype=torch.long, device=probs.device)
    counts.scatter_add_(0, experts.flatten(), torch.ones_like(experts.flatten()))
    return probs, weights.contiguous(), experts, counts


def route_backward(grad_probs, grad_weights, probs, weights, experts, temperature,
                   normalize_weights):
    g = grad_probs.to(probs.dtype).clone() if grad_probs is not None else torch.zeros_like(probs)
    gw = grad_weights.to(probs.dtype)
    if normalize_weights:
        S = probs.gather(1, experts).sum(-1, keepdim=True)
        dot = (gw * weights.to(probs.dtype)).sum(-1, keepdim=True)
        g.scatter_add_(1, experts, (gw - dot) / S)
    else:
        g.scatter_add_(1, experts, gw)
    return probs * (g - (probs * g).sum(-1, keepdim=True)) / temperature


def align(experts, num_bins):
    flat = experts.flatten()
    order = torch.sort(flat, stable=True).indices
    counts = torch.zeros(num_bins, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    return order, torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


def _shrink_all(x, lora_A):
    E, R, D = lora_A.shape
    acc = acc_dtype(x.dtype)
    return (x.to(acc) @ lora_A.reshape(E * R, D).to(acc).T).view(-1, E, R)  # (T, E, R)


def lora_forward(x, lora_A, lora_B, weights, experts, scaling, num_null_experts):
    E, R, _ = lora_A.shape
    h_all = _shrink_all(x, lora_A)
    gates = _gates(weights, experts, E, num_null_experts)
    gated = (h_all * (scaling * gates)[:, :, None]).reshape(-1, E * R)
    y = gated @ lora_B.permute(0, 2, 1).reshape(E * R, -1).to(gated.dtype)
    is_lora = experts < E
    idx = torch.where(is_lora, experts, torch.zeros_like(experts))
    h = h_all.gather(1, idx[:, :, None].expand(-1, -1, R)) * is_lora[:, :, None]
    return y.to(x.dtype), h.reshape(-1, R).contiguous()


def lora_backward(grad_y, x, lora_A, lora_B, weights, experts, order, offsets, h, scaling,
                  num_null_experts):
    E, R, D = lora_A.shape
    acc = acc_dtype(x.dtype)
    h_all = _shrink_all(x, lora_A)
    gates = _gates(weights, experts, E, num_null_experts)
    b_flat = lora_B.permute(0, 2, 1).reshape(E * R, -1).to(acc)         # (E*R, O)
    dy = grad_y.to(acc)
    dz = (dy @ b_flat.T).view(-1, E, R)                                    # d(gated)
    gated = (h_all * (scaling * gates)[:, :, None]).reshape(-1, E * R)
    dB = (gated.T @ dy).view(E, R, -1).permute(0, 2, 1)                    # (E, O, R)
    dh = dz * (scaling * gates)[:, :, None]
    dgates = scaling * (dz * h_all).sum(-1)                                # (T, E)
    is_lora = experts < E
    idx = torch.where(is_lora, experts, torch.zeros_like(experts))
    dw = dgates.gather(1, idx) * is_lora
    dx = dh.reshape(-1, E * R) @ lora_A.reshape(E * R, D).to(acc)
    dA = (dh.reshape(-1, E * R).T @ x.to(acc)).view(E, R, D)
    return (dx.to(x.dtype), dw.to(weights.dtype), dA.to(lora_A.dtype).contiguous(),
            dB.to(lora_B.dtype).contiguous())


def gate_dense(h_all, weights, experts, num_experts, num_null_experts, scaling):
    gates = _gates(weights, experts, num_experts, num_null_experts).to(h_all.dtype)
    h3 = h_all.view(h_all.shape[0], num_experts, -1)
    return (h3 * (scaling * gates)[:, :, None]).reshape(h_all.shape)


def gate_dense_backward(grad_gated, h_all, weights, experts, num_experts, num_null_experts,
                        scaling):
    acc = acc_dtype(h_all.dtype)
    gates = _gates(weights, experts, num_experts, num_null_experts)
    g3 = grad_gated.to(acc).view(h_all.shape[0], num_experts, -1)
    h3 = h_all.to(acc).view(h_all.shape[0], num_experts, -1)
    dh = (g3 * (scaling * gates)[:, :, None]).reshape(h_all.shape).to(h_all.dtype)
    dgates = scaling * (g3 * h3).sum(-1)
    is_lora = experts < num_experts
    idx = torch.where(is_lora, experts, torch.zeros_like(experts))
    return dh, (dgates.gather(1, idx) * is_lora).to(weights.dtype)


OPS = {"route": route, "route_backward": route_backward, "align": align,
       "lora_forward": lora_forward, "lora_backward": lora_backward, "gate_dense": gate_dense,
       "gate_dense_backward": gate_dense_backward}


def register_cuda_fallbacks() -> None:
    """Registers each op above for CUDA unless the extension has a CUDA kernel for it."""
    for name, fn in OPS.items():
        if name in REGISTERED:
            continue
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"moe_ext::{name}", "CUDA"):
            torch.library.register_kernel(f"moe_ext::{name}", "cuda", fn)
            REGISTERED.append(name)
