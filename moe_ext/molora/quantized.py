"""Quantised base layers (QLoRA): what MoLoRA needs to know about them, without importing
their libraries.

A MoLoRALinear may wrap any nn.Linear subclass whose forward takes float x (..., D) and
returns (..., O): bitsandbytes' Linear4bit (NF4 / FP4, weight packed as uint8) and
Linear8bitLt (int8), torchao's quantised nn.Linear (a tensor-subclass weight). The base is
called as it is; the experts and the router live in the base's compute dtype
(`compute_dtype`), never in the packed storage dtype.

Saving writes the adapter only (the base is never dequantised into it) and records which
quantisation the base had (`base_quantization`); the adapter loads onto a quantised or a
float base of the same architecture alike. The ONNX export needs a float base
(`require_float_base`): load the base unquantised and the adapter onto it, or dequantise
the base first (transformers' `model.dequantize()` for bitsandbytes).
"""
from __future__ import annotations

import json
from typing import Optional

import torch
from torch import nn

QUANTIZING_PACKAGES = ("bitsandbytes", "torchao", "hqq", "optimum", "auto_gptq", "awq", "gptqmodel")


def _package(obj) -> str:
    return type(obj).__module__.split(".")[0]


def quantization_of(module: nn.Module) -> Optional[str]:
    """"<package> <class>" of a quantised linear layer (e.g. "bitsandbytes Linear4bit",
    "torchao AffineQuantizedTensor" for a torchao weight), None for a float one: a weight
    that is not floating point, or whose layer or weight class comes from a quantising
    package."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    if _package(module) in QUANTIZING_PACKAGES:
        return f"{_package(module)} {type(module).__name__}"
    if _package(weight) in QUANTIZING_PACKAGES:
        return f"{_package(weight)} {type(weight).__name__}"
    if not weight.is_floating_point():
        return f"{_package(module)} {type(module).__name__} ({weight.dtype} weight)"
    return None


def compute_dtype(base: nn.Module) -> torch.dtype:
    """The dtype of the experts and the router over `base`: its weight's for a float base;
    for a packed one (bitsandbytes) its `compute_dtype` (Linear4bit's
    bnb_4bit_compute_dtype) if set, else its bias's, else float32."""
    weight = base.weight
    if weight.is_floating_point():
        return weight.dtype
    for candidate in (getattr(base, "compute_dtype", None), getattr(base.bias, "dtype", None)):
        if isinstance(candidate, torch.dtype) and candidate.is_floating_point:
            return candidate
    return torch.float32


def quantized_modules(model: nn.Module) -> dict[str, str]:
    """{module name: quantization_of(module)} of every quantised layer of `model`."""
    found = {}
    for name, module in model.named_modules():
        kind = quantization_of(module)
        if kind is not None:
            found[name] = kind
    return found


def base_quantization(model: nn.Module) -> Optional[dict]:
    """What an adapter records about a quantised base: {"layers": sorted kinds of its
    quantised layers, "config": transformers' quantization_config as a dict, or None};
    None for a float base."""
    kinds = sorted(set(quantized_modules(model).values()))
    if not kinds:
        return None
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is not None and hasattr(config, "to_dict"):
        config = config.to_dict()
    if isinstance(config, dict):  # JSON values only (its enums are str; anything else as text)
        config = json.loads(json.dumps(config, default=str))
    return {"layers": kinds, "config": config if isinstance(config, dict) else None}


def require_float_base(model: nn.Module, what: str) -> None:
    """ValueError naming the first quantised layer when `model` has one: `what` (an
    export) needs float weights."""
    found = quantized_modules(model)
    if found:
        name, kind = next(iter(found.items()))
        raise ValueError(
            f"{what} needs a float base, but {len(found)} layers are quantised (first: "
            f"{name!r}, a {kind}). Load the base without quantization_config and the adapter "
            f"onto it (moe_ext.load_molora, or `moe-ext export --adapter`, which loads the "
            f"recorded base in float), or dequantise the base first (transformers' "
            f"model.dequantize() for bitsandbytes); see docs/guide-scale.md")
