"""moe_ext.functional.molora: the MoLoRA experts' delta, on the fastest kernel for the device.

    delta_t = s * sum_{k<K} w_{t,k} * B_{e(t,k)} A_{e(t,k)} x_t

Two strategies compute it (both exact, both differentiable in x, router_logits, lora_A,
lora_B, logit_bias):
  "sparse": grouped kernels that touch only the K chosen experts per token (CPU: token
            blocks with expert runs; CUDA: tiles of expert-sorted (token, k) pairs);
  "dense":  the dense-gated form: one GEMM for all experts' shrink x A_all^T, a mask to the
            chosen experts scaled by s*w, one GEMM with B_all. Wins when K is close to E.
"auto" picks by the rule in `choose_strategy` (measured on CPU; on CUDA still to be measured).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .. import ops

STRATEGIES = ("auto", "sparse", "dense")


class MoLoRAOutput(NamedTuple):
    delta: torch.Tensor    # (..., O)
    probs: torch.Tensor    # (T, E + N) routing probabilities (float32/float64)
    experts: torch.Tensor  # (T, K) chosen expert ids (>= E: null experts)
    counts: torch.Tensor   # (E + N,) tokens routed to each expert


def choose_strategy(num_experts: int, top_k: int, rank: int, device: torch.device) -> str:
    """Dense-gated does E/K times the LoRA FLOPs of sparse but runs them as BLAS GEMMs.

    CPU, measured on a 2-core AMD EPYC (fp32, T=4096, D=O=1024, R=16, forward+backward):
    E=8:  K=2 sparse 36 ms vs dense 50 ms; K=4 sparse 64 ms vs dense 52 ms;
          K=8 sparse 114 ms vs dense 51 ms.   E=64, K=2: sparse 39 ms vs dense 303 ms.
    Sparse time grows with K, dense time does not, so dense wins from about K >= E/3.

    CUDA: dense while E*R <= 256 (the design's lead: there lora_dense runs fused tensor-core
    kernels for bf16 / fp16 that read x once, docs/architecture.md "Dense-gated path on
    tensor cores", while the sparse path reads each x row once per chosen expert) or
    K >= E/3. NOT YET MEASURED: the CUDA kernels have not run on a GPU; the crossover is
    to be re-measured with benchmarks/bench_lora.py (providers moe_ext-sparse/-dense)."""
    if torch.device(device).type == "cuda" and num_experts * rank <= 256:
        return "dense"
    return "dense" if 3 * top_k >= num_experts else "sparse"


def _check(x, router_logits, lora_A, lora_B, top_k, num_null_experts, strategy, logit_bias):
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a tensor of shape (..., D), got {type(x).__name__}")
    if not isinstance(lora_A, torch.Tensor) or lora_A.dim() != 3:
        raise ValueError(f"lora_A must have shape (E, R, D), got {getattr(lora_A, 'shape', lora_A)}")
    if not isinstance(lora_B, torch.Tensor) or lora_B.dim() != 3:
        raise ValueError(f"lora_B must have shape (E, O, R), got {getattr(lora_B, 'shape', lora_B)}")
    E, R, D = lora_A.shape
    if x.shape[-1] != D:
        raise ValueError(f"x has {x.shape[-1]} features but lora_A expects D={D}")
    if lora_B.shape[0] != E or lora_B.shape[2] != R:
        raise ValueError(f"lora_B shape {tuple(lora_B.shape)} does not match lora_A (E={E}, R={R})")
    if num_null_experts < 0:
        raise ValueError(f"num_null_experts must be >= 0, got {num_null_experts}")
    M = E + num_null_experts
    if not isinstance(router_logits, torch.Tensor) or tuple(router_logits.shape) != (*x.shape[:-1], M):
        raise ValueError(f"router_logits must have shape {(*x.shape[:-1], M)} (x's leading dims, "
                         f"E + num_null_experts), got {tuple(getattr(router_logits, 'shape', ()))}")
    if not 1 <= top_k <= M:
        raise ValueError(f"top_k must be in [1, {M}] (E + num_null_experts), got {top_k}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if logit_bias is not None:
        if not isinstance(logit_bias, torch.Tensor) or tuple(logit_bias.shape) != (M,):
            raise ValueError(f"logit_bias must be a tensor of shape ({M},) (E + num_null_experts), "
                             f"got {tuple(getattr(logit_bias, 'shape', ())) or type(logit_bias).__name__}")
        if not logit_bias.is_floating_point():
            raise ValueError(f"logit_bias must be a floating-point tensor, got {logit_bias.dtype}")
    named = (("router_logits", router_logits), ("lora_A", lora_A), ("lora_B", lora_B),
             ("logit_bias", logit_bias))
    for name, t in named:
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    for name, t in (("x", x), ("router_logits", router_logits)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if t.dtype != x.dtype:
            raise ValueError(f"{name} dtype {t.dtype} must equal x dtype {x.dtype}")


def molora_with_routing(x: torch.Tensor, router_logits: torch.Tensor, lora_A: torch.Tensor,
                        lora_B: torch.Tensor, top_k: int, scaling: float,
                        num_null_experts: int = 0, normalize_weights: bool = True, *,
                        temperature: float = 1.0, logit_bias: Optional[torch.Tensor] = None,
                        strategy: str = "auto") -> MoLoRAOutput:
    """`molora` that also returns the routing (probs keep their graph, for router losses)."""
    _check(x, router_logits, lora_A, lora_B, top_k, num_null_experts, strategy, logit_bias)
    E, R, D = lora_A.shape
    O = lora_B.shape[1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, D)
    routing = ops.route(router_logits.reshape(-1, E + num_null_experts), top_k, temperature,
                        logit_bias, normalize_weights)
    weights = routing.weights.to(ops.acc_dtype(x.dtype))
    if strategy == "auto":
        strategy = choose_strategy(E, top_k, R, x.device)
    if strategy == "sparse":
        y = ops.lora_sparse(x2, lora_A, lora_B, weights, routing.experts, scaling, num_null_experts)
    else:
        y = ops.lora_dense(x2, lora_A, lora_B, weights, routing.experts, scaling, num_null_experts)
    # 2-D x: the op's own tensor, not a view of it (MoLoRALinear adds the base GEMM into it
    # in place, which on a view would cost autograd two more passes over it in backward)
    delta = y if len(lead) == 1 else y.reshape(*lead, O)
    return MoLoRAOutput(delta, routing.probs, routing.experts, routing.counts)


def dense_shrink_with_router(x: torch.Tensor, lora_A: torch.Tensor,
                             router_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every expert's shrink and the router logits in one GEMM, so x is read once:
    [h_all | logits] = x [A_all; Wr]^T.

    x (T, D), lora_A (E, R, D), router_weight (M, D) = Wr of a bias-free router, in x's
    dtype. Returns h_all (T, E*R) and logits (T, M), views of one (T, E*R + M) product
    (differentiable: autograd's GEMM then gives dx = [dh_all | dlogits] [A_all; Wr] in one
    pass too). `molora_from_shrink` finishes the dense-gated strategy from them."""
    E, R, D = lora_A.shape
    if x.dim() != 2 or x.shape[1] != D:
        raise ValueError(f"x must have shape (T, {D}), got {tuple(x.shape)}")
    h_all, logits = (x @ shrink_router_weight(lora_A, router_weight).T).split(
        [E * R, router_weight.shape[0]], dim=-1)
    return h_all, logits


def shrink_router_weight(lora_A: torch.Tensor, router_weight: torch.Tensor) -> torch.Tensor:
    """[A_all; Wr] (E*R + M, D): lora_A (E, R, D) viewed as A_all (E*R, D) above the router's
    weight (M, D), in lora_A's dtype; x times its transpose is [h_all | logits]."""
    E, R, D = lora_A.shape
    if router_weight.dim() != 2 or router_weight.shape[1] != D:
        raise ValueError(f"router_weight must have shape (M, {D}), got {tuple(router_weight.shape)}")
    return torch.cat([lora_A.reshape(E * R, D), router_weight.to(lora_A.dtype)])


def molora_from_shrink(h_all: torch.Tensor, router_logits: torch.Tensor, lora_B: torch.Tensor,
                       top_k: int, scaling: float, num_null_experts: int = 0,
                       normalize_weights: bool = True, *, temperature: float = 1.0,
                       logit_bias: Optional[torch.Tensor] = None) -> MoLoRAOutput:
    """The dense-gated strategy from a given shrink h_all (T, E*R) = x A_all^T: routes
    `router_logits` (T, E + N) and returns the delta (T, O) = s * gate(h_all) B_all^T with
    the routing, as `molora_with_routing` does."""
    if not isinstance(lora_B, torch.Tensor) or lora_B.dim() != 3:
        raise ValueError(f"lora_B must have shape (E, O, R), got {getattr(lora_B, 'shape', lora_B)}")
    M = lora_B.shape[0] + num_null_experts
    if router_logits.dim() != 2 or tuple(router_logits.shape) != (h_all.shape[0], M):
        raise ValueError(f"router_logits must have shape {(h_all.shape[0], M)} (h_all's tokens, "
                         f"E + num_null_experts), got {tuple(router_logits.shape)}")
    routing = ops.route(router_logits, top_k, temperature, logit_bias, normalize_weights)
    weights = routing.weights.to(ops.acc_dtype(h_all.dtype))
    delta = ops.lora_dense_expand(h_all, lora_B, weights, routing.experts, scaling,
                                  num_null_experts)
    return MoLoRAOutput(delta, routing.probs, routing.experts, routing.counts)


def molora(x: torch.Tensor, router_logits: torch.Tensor, lora_A: torch.Tensor,
           lora_B: torch.Tensor, top_k: int, scaling: float, num_null_experts: int = 0,
           normalize_weights: bool = True, *, temperature: float = 1.0,
           logit_bias: Optional[torch.Tensor] = None, strategy: str = "auto") -> torch.Tensor:
    """The experts' delta only (no base layer).

    Args:
      x: (..., D) input, any leading dims.
      router_logits: (..., E + N) router scores for the same tokens.
      lora_A: (E, R, D); lora_B: (E, O, R); same dtype and device as x.
      top_k: K experts per token, 1 <= K <= E + N (K = E + N is dense soft routing).
      scaling: s = lora_alpha / R.
      num_null_experts: N experts with output 0 (ids E..E+N-1) that keep their weight share.
      normalize_weights: renormalise the K chosen probabilities to sum to 1.
      temperature: softmax temperature tau; logit_bias: (E + N,) added to the logits.
      strategy: "auto", "sparse" or "dense" (see the module docstring).
    Returns:
      delta (..., O) in x's dtype.
    """
    return molora_with_routing(x, router_logits, lora_A, lora_B, top_k, scaling,
                               num_null_experts, normalize_weights, temperature=temperature,
                               logit_bias=logit_bias, strategy=strategy).delta
