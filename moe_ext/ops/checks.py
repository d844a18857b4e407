"""Argument checks of the fake (meta) kernels, the same as csrc/checks.h runs in the real ones:
shapes and values raise ValueError, dtypes and devices RuntimeError, each naming the
argument. They matter because a meta tensor among real ones dispatches to the fake kernel:
without them `route(cpu_logits, meta_bias)` would "succeed". Written with torch._check so
that symbolic shapes (torch.compile, torch.export) turn them into guards, not errors.

Notation (docs/architecture.md#notation).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .common import acc_dtype

FLOATS = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
MAX_EXPERTS = 2**31 - 1  # csrc/checks.h: kMaxExperts (M = E + N)
MAX_BINS = 2**24         # csrc/checks.h: kMaxBins


def value(cond, message: str) -> None:
    torch._check_value(cond, lambda: message)


def same_device(**tensors: Optional[torch.Tensor]) -> None:
    """Every given tensor on the first one's device (meta mixed with real tensors is an error)."""
    named = [(n, t) for n, t in tensors.items() if t is not None]
    ref_name, ref = named[0]
    for name, t in named[1:]:
        torch._check(t.device == ref.device,
                     lambda n=name, t=t: f"{n} is on {t.device} but {ref_name} is on {ref.device}")


def dim(t: torch.Tensor, n: int, name: str) -> None:
    value(t.dim() == n, f"{name} must be a {n}-D tensor, got shape {tuple(t.shape)}")


def dtype(t: torch.Tensor, allowed, name: str) -> None:
    torch._check(t.dtype in allowed, lambda: f"{name} must be one of {allowed}, got {t.dtype}")


def temperature(tau: float, acc: torch.dtype) -> None:
    largest = torch.finfo(acc).max
    value(0 < tau < math.inf and 1.0 / tau <= largest,
          f"temperature must be a positive finite number whose inverse is finite in {acc}, "
          f"got {tau}")


def scaling(s: float, dtype: torch.dtype) -> None:
    """Finite in the accumulation dtype, where the kernels multiply by it (1e39 is inf in
    float32, and inf * 0 would turn zero inputs into NaN)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    value(math.isfinite(s) and abs(s) <= torch.finfo(acc).max,
          f"scaling must be a finite number in {acc} (the accumulation dtype of {dtype} inputs), "
          f"got {s}")


def num_null_experts(N: int, E: int) -> None:
    value(1 <= E <= MAX_EXPERTS, f"the number of LoRA experts E must be in [1, {MAX_EXPERTS}], got {E}")
    value(0 <= N <= MAX_EXPERTS - E, f"num_null_experts must be in [0, {MAX_EXPERTS - E}], got {N}")


def routing(weights, experts, T, ref: torch.Tensor, ref_name: str) -> None:
    """weights (T, K) in the accumulation dtype of ref, experts (T, K) int64."""
    dim(weights, 2, "weights")
    dim(experts, 2, "experts")
    value(weights.shape == experts.shape,
          f"weights shape {tuple(weights.shape)} must equal experts shape {tuple(experts.shape)}")
    value(weights.shape[0] == T, f"weights has {weights.shape[0]} rows but {ref_name} has {T} tokens")
    dtype(experts, (torch.int64,), "experts")
    dtype(weights, (acc_dtype(ref.dtype),), "weights")


def route_args(logits, bias, top_k, tau) -> None:
    same_device(router_logits=logits, logit_bias=bias)
    dim(logits, 2, "router_logits")
    dtype(logits, FLOATS, "router_logits")
    M = logits.shape[1]
    value(M >= 1, "router_logits needs at least one expert column")
    value(1 <= top_k <= M, f"top_k must be in [1, {M}], got {top_k}")
    temperature(tau, acc_dtype(logits.dtype))
    if bias is not None:
        dim(bias, 1, "logit_bias")
        dtype(bias, FLOATS, "logit_bias")
        value(bias.shape[0] == M, f"logit_bias must have shape ({M},), got {tuple(bias.shape)}")


def route_backward_args(grad_probs, grad_weights, probs, weights, experts, tau) -> None:
    same_device(probs=probs, grad_probs=grad_probs, grad_weights=grad_weights, weights=weights,
                experts=experts)
    dim(probs, 2, "probs")
    dtype(probs, (torch.float32, torch.float64), "probs")
    temperature(tau, probs.dtype)
    dim(experts, 2, "experts")
    dtype(experts, (torch.int64,), "experts")
    value(experts.shape[0] == probs.shape[0], f"experts must have {probs.shape[0]} rows")
    for name, t in (("grad_weights", grad_weights), ("weights", weights)):
        value(t.shape == experts.shape, f"{name} shape {tuple(t.shape)} must equal experts shape")
        dtype(t, FLOATS, name)
    if grad_probs is not None:
        value(grad_probs.shape == probs.shape, "grad_probs shape must equal probs shape")
        dtype(grad_probs, FLOATS, "grad_probs")


def align_args(experts, num_bins) -> None:
    dim(experts, 2, "experts")
    dtype(experts, (torch.int64,), "experts")
    value(1 <= num_bins <= MAX_BINS, f"num_bins must be in [1, {MAX_BINS}], got {num_bins}")


def lora_forward_args(x, lora_A, lora_B, weights, experts, s, N) -> None:
    same_device(x=x, lora_A=lora_A, lora_B=lora_B, weights=weights, experts=experts)
    dim(x, 2, "x")
    dim(lora_A, 3, "lora_A")
    dim(lora_B, 3, "lora_B")
    dtype(x, FLOATS, "x")
    dtype(lora_A, (x.dtype,), "lora_A")
    dtype(lora_B, (x.dtype,), "lora_B")
    E, R, D = lora_A.shape
    value(D == x.shape[1], f"lora_A has D={D} but x has D={x.shape[1]}")
    value(lora_B.shape[0] == E and lora_B.shape[2] == R,
          f"lora_B shape {tuple(lora_B.shape)} does not match lora_A (E={E}, R={R})")
    value(E >= 1 and R >= 1, f"lora_A needs E >= 1 and R >= 1, got shape {tuple(lora_A.shape)}")
    routing(weights, experts, x.shape[0], x, "x")
    scaling(s, x.dtype)
    num_null_experts(N, E)


def lora_backward_args(grad_y, x, lora_A, lora_B, weights, experts, order, offsets, h, s,
                       N) -> None:
    lora_forward_args(x, lora_A, lora_B, weights, experts, s, N)
    same_device(x=x, grad_y=grad_y, order=order, offsets=offsets, h=h)
    T, E, R, O, K = x.shape[0], lora_A.shape[0], lora_A.shape[1], lora_B.shape[1], experts.shape[1]
    value(grad_y.shape == (T, O), f"grad_y must have shape ({T}, {O}), got {tuple(grad_y.shape)}")
    dtype(grad_y, FLOATS, "grad_y")
    value(h.shape == (T * K, R), f"h must have shape ({T * K}, {R}), got {tuple(h.shape)}")
    dtype(h, FLOATS, "h")
    value(order.shape == (T * K,), f"order must have shape ({T * K},), got {tuple(order.shape)}")
    value(offsets.shape == (E + 2,), f"offsets must have shape ({E + 2},), got {tuple(offsets.shape)}")
    dtype(order, (torch.int64,), "order")
    dtype(offsets, (torch.int64,), "offsets")


def lora_dense_backward_args(grad_y, x, lora_A, lora_B, weights, experts, h_all, s, N) -> None:
    lora_forward_args(x, lora_A, lora_B, weights, experts, s, N)
    same_device(x=x, grad_y=grad_y, h_all=h_all)
    T, E, R, O = x.shape[0], lora_A.shape[0], lora_A.shape[1], lora_B.shape[1]
    value(grad_y.shape == (T, O), f"grad_y must have shape ({T}, {O}), got {tuple(grad_y.shape)}")
    dtype(grad_y, FLOATS, "grad_y")
    value(h_all.shape == (T, E * R),
          f"h_all must have shape ({T}, {E * R}) (T, E*R), got {tuple(h_all.shape)}")
    dtype(h_all, FLOATS, "h_all")


def lora_dense_expand_args(h_all, lora_B, weights, experts, s, N) -> None:
    same_device(h_all=h_all, lora_B=lora_B, weights=weights, experts=experts)
    dim(h_all, 2, "h_all")
    dim(lora_B, 3, "lora_B")
    dtype(h_all, FLOATS, "h_all")
    dtype(lora_B, (h_all.dtype,), "lora_B")
    E, _, R = lora_B.shape
    value(E >= 1 and R >= 1, f"lora_B needs E >= 1 and R >= 1, got shape {tuple(lora_B.shape)}")
    value(h_all.shape[1] == E * R,
          f"h_all must have E*R columns (E={E}, R={R} from lora_B), got shape {tuple(h_all.shape)}")
    routing(weights, experts, h_all.shape[0], h_all, "h_all")
    scaling(s, h_all.dtype)
    num_null_experts(N, E)


def lora_dense_expand_backward_args(grad_y, h_all, lora_B, weights, experts, s, N) -> None:
    lora_dense_expand_args(h_all, lora_B, weights, experts, s, N)
    same_device(h_all=h_all, grad_y=grad_y)
    T, O = h_all.shape[0], lora_B.shape[1]
    value(grad_y.shape == (T, O), f"grad_y must have shape ({T}, {O}), got {tuple(grad_y.shape)}")
    dtype(grad_y, FLOATS, "grad_y")
