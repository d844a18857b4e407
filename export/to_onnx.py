"""to_onnx: torch.onnx.export(dynamo=True) with moe_ext's custom ops translated to standard
ONNX, dynamic batch/sequence dims, fp32 or fp16, metadata, atomic write."""
from __future__ import annotations

import json
from typing import Optional

import torch
from torch import nn

from moe_ext import __version__
from moe_ext.molora import MoLoRALinear

from .program import cast_for_export, export_graph
from .reward import REWARD_KINDS, reward_kind, reward_to_onnx

# kind -> (input names in order, required inputs, output name); reward models: reward.py
KINDS = {
    "causal_lm": (("input_ids", "attention_mask"), ("input_ids",), "logits"),
    "molora_linear": (("x",), ("x",), "y"),
}


def model_kind(model: nn.Module) -> str:
    if isinstance(model, MoLoRALinear):
        return "molora_linear"
    if reward_kind(model) is not None:
        return reward_kind(model)
    if hasattr(model, "molora_config") and hasattr(model, "config") and \
            callable(getattr(model, "get_output_embeddings", None)):
        return "causal_lm"
    raise ValueError(f"to_onnx exports a MoLoRA-injected transformers causal LM, a "
                     f"SparseMoERewardModel, a BackboneRewardModel or a MoLoRALinear; got "
                     f"{type(model).__name__}")


class _Graph(nn.Module):
    """One or two positional inputs and a single tensor output, for the exporter."""

    def __init__(self, model: nn.Module, kind: str, names: tuple[str, ...]):
        super().__init__()
        self.model, self.kind, self.names = model, kind, names

    def run(self, inputs: dict):
        if self.kind == "causal_lm":
            return self.model(**inputs, use_cache=False).logits
        return self.model(inputs["x"])


class _Graph1(_Graph):
    def forward(self, a):
        return self.run({self.names[0]: a})


class _Graph2(_Graph):
    def forward(self, a, b):
        return self.run({self.names[0]: a, self.names[1]: b})


def _dynamic_shapes(kind: str, names, tensors):
    if kind == "causal_lm":
        return tuple({0: "batch", 1: "sequence"} for _ in names)
    return ({i: f"dim{i}" for i in range(tensors[0].dim() - 1)},)


def _metadata(model: nn.Module, kind: str) -> dict[str, str]:
    meta = {"moe_ext.kind": kind, "moe_ext.version": __version__}
    config = model.config if kind == "molora_linear" else model.molora_config
    meta["moe_ext.molora_config"] = json.dumps(config.to_dict())
    if kind == "causal_lm":
        meta["moe_ext.vocab_size"] = str(model.config.vocab_size)
    return meta


def to_onnx(model: nn.Module, path: str, example_inputs: dict[str, torch.Tensor],
            dynamic: bool = True, dtype: Optional[str] = None, opset: int = 18) -> str:
    """Exports `model` to `path` and returns the path.

    model: a MoLoRA-injected HF causal LM (inputs input_ids [, attention_mask]; output
      "logits"), a MoLoRALinear (input x; output "y"), or a reward model: a
      SparseMoERewardModel (inputs prompt_emb, response_emb) or a BackboneRewardModel
      (token inputs), each optionally with a user_weights input; outputs "rewards",
      "expert_rewards" [, "routing_weights"] (see export/reward.py).
    example_inputs: name -> tensor, used to trace; other shapes work when dynamic=True.
    dtype: None (the model's), "float32" or "float16" (weights and float inputs cast).
    """
    kind = model_kind(model)
    if kind in REWARD_KINDS:
        return reward_to_onnx(model, path, example_inputs, dynamic, dtype, opset)
    order, required, output = KINDS[kind]
    if not isinstance(example_inputs, dict):
        raise ValueError("example_inputs must be a dict of input name -> tensor")
    unknown = sorted(set(example_inputs) - set(order))
    missing = [n for n in required if n not in example_inputs]
    if unknown or missing:
        raise ValueError(f"example_inputs for a {kind}: expected {list(order)} (required "
                         f"{list(required)}); unknown {unknown}, missing {missing}")
    names = tuple(n for n in order if n in example_inputs)
    model, tensors = cast_for_export(model, [example_inputs[n] for n in names], dtype)
    graph = (_Graph1 if len(names) == 1 else _Graph2)(model, kind, names)
    return export_graph(graph, model, tensors, names, [output],
                        _dynamic_shapes(kind, names, tensors) if dynamic else None,
                        _metadata(model, kind), path, opset)
