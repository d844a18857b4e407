"""to_onnx: torch.onnx.export(dynamo=True) with moe_ext's custom ops translated to standard
ONNX, dynamic batch/sequence dims, fp32 or fp16, metadata, atomic write."""
from __future__ import annotations

import copy
import json
import os
from typing import Optional

import torch
from torch import nn

from moe_ext import __version__
from moe_ext.molora import MoLoRALinear
from moe_ext.reward import SparseMoERewardModel
from moe_ext.utils.io import atomic_write

from .onnx_ops import translation_table
from .tracing import tracing_context

# kind -> (input names in order, required inputs, output name)
KINDS = {
    "causal_lm": (("input_ids", "attention_mask"), ("input_ids",), "logits"),
    "reward_model": (("prompt_emb", "response_emb"), ("prompt_emb", "response_emb"), "rewards"),
    "molora_linear": (("x",), ("x",), "y"),
}


def model_kind(model: nn.Module) -> str:
    if isinstance(model, MoLoRALinear):
        return "molora_linear"
    if isinstance(model, SparseMoERewardModel):
        return "reward_model"
    if hasattr(model, "molora_config") and hasattr(model, "config") and \
            callable(getattr(model, "get_output_embeddings", None)):
        return "causal_lm"
    raise ValueError(f"to_onnx exports a MoLoRA-injected transformers causal LM, a "
                     f"SparseMoERewardModel or a MoLoRALinear; got {type(model).__name__}")


class _Graph(nn.Module):
    """One or two positional inputs and a single tensor output, for the exporter."""

    def __init__(self, model: nn.Module, kind: str, names: tuple[str, ...]):
        super().__init__()
        self.model, self.kind, self.names = model, kind, names

    def run(self, inputs: dict):
        if self.kind == "causal_lm":
            return self.model(**inputs, use_cache=False).logits
        if self.kind == "reward_model":
            return self.model(inputs["prompt_emb"], inputs["response_emb"])
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
    if kind == "reward_model":
        return tuple({0: "batch"} for _ in names)
    return ({i: f"dim{i}" for i in range(tensors[0].dim() - 1)},)


def _metadata(model: nn.Module, kind: str) -> dict[str, str]:
    meta = {"moe_ext.kind": kind, "moe_ext.version": __version__}
    if kind == "reward_model":
        meta["moe_ext.reward_config"] = json.dumps(model.config.to_dict())
    else:
        config = model.config if kind == "molora_linear" else model.molora_config
        meta["moe_ext.molora_config"] = json.dumps(config.to_dict())
    if kind == "causal_lm":
        meta["moe_ext.vocab_size"] = str(model.config.vocab_size)
    return meta


@tracing_context()
def to_onnx(model: nn.Module, path: str, example_inputs: dict[str, torch.Tensor],
            dynamic: bool = True, dtype: Optional[str] = None, opset: int = 18) -> str:
    """Exports `model` to `path` and returns the path.

    model: a MoLoRA-injected HF causal LM (inputs input_ids [, attention_mask]; output
      "logits"), a SparseMoERewardModel (inputs prompt_emb, response_emb; output "rewards")
      or a MoLoRALinear (input x; output "y").
    example_inputs: name -> tensor, used to trace; other shapes work when dynamic=True.
    dtype: None (the model's), "float32" or "float16" (weights and float inputs cast).
    """
    import onnx

    kind = model_kind(model)
    order, required, output = KINDS[kind]
    if not isinstance(example_inputs, dict):
        raise ValueError("example_inputs must be a dict of input name -> tensor")
    unknown = sorted(set(example_inputs) - set(order))
    missing = [n for n in required if n not in example_inputs]
    if unknown or missing:
        raise ValueError(f"example_inputs for a {kind}: expected {list(order)} (required "
                         f"{list(required)}); unknown {unknown}, missing {missing}")
    if dtype not in (None, "float32", "float16"):
        raise ValueError(f"dtype must be None, 'float32' or 'float16', got {dtype!r}")
    names = tuple(n for n in order if n in example_inputs)
    tensors = [example_inputs[n] for n in names]
    if dtype is not None:
        target = torch.float16 if dtype == "float16" else torch.float32
        model = copy.deepcopy(model).to(target)
        tensors = [t.to(target) if t.is_floating_point() else t for t in tensors]
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"output folder does not exist: {folder!r}")
    was_training = model.training
    model.eval()
    try:
        program = torch.onnx.export(
            (_Graph1 if len(names) == 1 else _Graph2)(model, kind, names).eval(), tuple(tensors), dynamo=True, input_names=list(names),
            output_names=[output], opset_version=opset,
            dynamic_shapes=_dynamic_shapes(kind, names, tensors) if dynamic else None,
            custom_translation_table=translation_table(), optimize=True, verbose=False)
    finally:
        model.train(was_training)
    proto = program.model_proto
    for key, value in _metadata(model, kind).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    atomic_write(path, lambda tmp: onnx.save(proto, tmp))
    return path
