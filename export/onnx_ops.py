"""ONNX translations of the moe_ext custom ops, in standard ONNX ops only (onnxscript, opset
18), so exported models run on any execution provider without a custom-op library.

The LoRA ops are translated to their dense-gated form: one MatMul for all experts' shrink,
the K routing weights scattered into a (T, E) gate matrix (ScatterElements with add, so a
null expert or a repeated id works), one MatMul for the expand. It is exact, has no
data-dependent shapes, and keeps every expert reachable whatever the export example routed.
"""
from __future__ import annotations

import torch
from onnxscript import FLOAT, INT64
from onnxscript import opset18 as op

import moe_ext.ops  # noqa: F401  (loads the op library)


def _ints(values):
    return op.Constant(value_ints=list(values))


def route(router_logits, logit_bias, top_k: int, temperature: float, normalize_weights: bool):
    """-> probs (T, M) float32, weights (T, K) float32, experts (T, K) int64, counts (M,) int64."""
    z = op.Cast(router_logits, to=FLOAT.dtype)
    if logit_bias is not None:
        z = op.Add(z, op.Cast(logit_bias, to=FLOAT.dtype))
    if temperature != 1.0:
        z = op.Div(z, op.Constant(value_float=float(temperature)))
    probs = op.Softmax(z, axis=-1)
    weights, experts = op.TopK(probs, _ints([top_k]), axis=-1, largest=1, sorted=1)  # ties: lower id
    if normalize_weights:
        weights = op.Div(weights, op.ReduceSum(weights, _ints([-1]), keepdims=1))
    depth = op.Shape(probs, start=1, end=2)
    onehot = op.OneHot(experts, depth, op.Constant(value_ints=[0, 1]), axis=-1)
    counts = op.ReduceSum(onehot, _ints([0, 1]), keepdims=0)
    return probs, weights, experts, counts


def _gates(weights, experts, tokens, num_experts, num_null_experts: int, dtype):
    """(T, E) gate matrix: weights scattered to their experts, null-expert columns dropped."""
    width = op.Add(num_experts, op.Constant(value_ints=[num_null_experts]))
    zeros = op.Expand(op.Constant(value_float=0.0), op.Concat(tokens, width, axis=0))
    full = op.ScatterElements(zeros, experts, op.Cast(weights, to=FLOAT.dtype), axis=1,
                              reduction="add")
    return op.CastLike(op.Slice(full, _ints([0]), num_experts, _ints([1])), dtype)


def _dense_gated(x, lora_A, lora_B, weights, experts, scaling: float, num_null_experts: int):
    """y = ((x A_all^T) * gates * s) B_all -> (y (T, O), h_all (T, E*R), h3 (T, E, R))."""
    E = op.Shape(lora_A, start=0, end=1)
    ER = op.Concat(E, op.Shape(lora_A, start=1, end=2), axis=0)  # [E, R]
    tokens = op.Shape(x, start=0, end=1)
    a_flat = op.Reshape(lora_A, op.Concat(_ints([-1]), op.Shape(lora_A, start=2, end=3), axis=0))
    h_all = op.MatMul(x, op.Transpose(a_flat, perm=[1, 0]))                    # (T, E*R)
    h3 = op.Reshape(h_all, op.Concat(tokens, ER, axis=0))                      # (T, E, R)
    gates = _gates(weights, experts, tokens, E, num_null_experts, x)           # (T, E)
    gated = op.Mul(h3, op.Unsqueeze(op.Mul(gates, op.CastLike(op.Constant(value_float=float(scaling)), x)),
                                    _ints([2])))
    b_flat = op.Reshape(op.Transpose(lora_B, perm=[0, 2, 1]),
                        op.Concat(_ints([-1]), op.Shape(lora_B, start=1, end=2), axis=0))  # (E*R, O)
    y = op.MatMul(op.Reshape(gated, op.Concat(tokens, _ints([-1]), axis=0)), b_flat)
    return y, h_all, h3


def lora_dense_forward(x, lora_A, lora_B, weights, experts, scaling: float,
                       num_null_experts: int):
    """The dense-gated op as it is: y (T, O) and h_all (T, E*R) = x A_all^T."""
    y, h_all, _ = _dense_gated(x, lora_A, lora_B, weights, experts, scaling, num_null_experts)
    return y, h_all


def lora_forward(x, lora_A, lora_B, weights, experts, scaling: float, num_null_experts: int):
    """Dense-gated: y as in lora_dense_forward; h (T*K, R) = the chosen experts' shrink (0 for
    null experts), as the kernel returns it."""
    y, _, h3 = _dense_gated(x, lora_A, lora_B, weights, experts, scaling, num_null_experts)
    E = op.Shape(lora_A, start=0, end=1)
    # h: gather each chosen expert's R values; null experts (id >= E) give 0
    is_lora = op.Less(experts, E)
    safe = op.Where(is_lora, experts, op.Constant(value_ints=[0]))
    R = op.Shape(lora_A, start=1, end=2)
    idx = op.Expand(op.Unsqueeze(safe, _ints([2])),
                    op.Concat(op.Shape(experts), R, axis=0))                 # (T, K, R)
    h_sel = op.GatherElements(op.Cast(h3, to=FLOAT.dtype), idx, axis=1)
    h_sel = op.Mul(h_sel, op.Unsqueeze(op.Cast(is_lora, to=FLOAT.dtype), _ints([2])))
    h = op.Reshape(h_sel, op.Concat(_ints([-1]), R, axis=0))
    order, offsets = _pair_alignment(experts, E)
    return y, h, order, offsets


def _pair_alignment(experts, E):
    """The op's last two outputs (unused by inference graphs, so they are pruned): order
    (P,) = the pairs stably sorted by min(expert, E), offsets (E + 2,) the bin starts."""
    bins = op.Min(op.Reshape(experts, _ints([-1])), E)                      # (P,)
    pairs = op.Shape(bins)
    key = op.Add(op.Mul(bins, pairs), op.Range(op.Constant(value_int=0),
                                              op.Squeeze(pairs), op.Constant(value_int=1)))
    _, order = op.TopK(key, pairs, axis=0, largest=0, sorted=1)              # ties impossible
    onehot = op.OneHot(bins, op.Add(E, _ints([1])), op.Constant(value_ints=[0, 1]), axis=-1)
    counts = op.ReduceSum(onehot, _ints([0]), keepdims=0)                     # (E + 1,)
    offsets = op.Concat(_ints([0]), op.CumSum(counts, _ints([0])), axis=0)
    return order, offsets


def translation_table() -> dict:
    """custom_translation_table for torch.onnx.export(dynamo=True)."""
    ops = torch.ops.moe_ext
    return {ops.route.default: route, ops.lora_forward.default: lora_forward,
            ops.lora_dense_forward.default: lora_dense_forward}


__all__ = ["translation_table", "route", "lora_forward", "lora_dense_forward", "INT64"]
