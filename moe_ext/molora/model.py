"""MoLoRA inside any model: inject into target modules, freeze the rest, turn adapters off
(the DPO reference for free), read the routing, steer it. Saving and loading the adapter
is in saving.py."""
from __future__ import annotations

import contextlib
import re
from typing import Iterator, Optional, Union

from torch import nn

from .config import MoLoRAConfig
from .layer import MoLoRALinear, is_conv1d


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _output_embedding_names(model: nn.Module) -> set[str]:
    """Names of modules that produce the vocabulary logits (kept out of "all-linear")."""
    names = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if module is head or name.split(".")[-1] in ("lm_head", "score", "classifier"):
            names.add(name)
    return names


def find_target_modules(model: nn.Module, target_modules: Union[str, list[str], None]) -> list[str]:
    """Names of the linear modules to wrap. target_modules: a list of name suffixes
    ("q_proj" matches "model.layers.0.self_attn.q_proj"), a single string used as a regex
    that must match the whole name, or "all-linear" (every nn.Linear / Conv1D but the
    output head)."""
    if target_modules is None:
        raise ValueError("MoLoRAConfig.target_modules must be set: a list of module-name "
                         "suffixes, a regex string, or 'all-linear'")
    heads = _output_embedding_names(model)
    names = []
    for name, module in model.named_modules():
        if not name or not _is_linear(module) or isinstance(module, MoLoRALinear):
            continue
        if target_modules == "all-linear":
            hit = name not in heads
        elif isinstance(target_modules, str):
            hit = re.fullmatch(target_modules, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in target_modules)
        if hit:
            names.append(name)
    if not names:
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear or Conv1D "
                         f"module of {type(model).__name__}")
    return names


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def get_molora_model(model: nn.Module, config: MoLoRAConfig) -> nn.Module:
    """Wraps config.target_modules of `model` in MoLoRALinear layers in place, freezes every
    other parameter, stores the config as `model.molora_config`, and returns the model."""
    if not isinstance(config, MoLoRAConfig):
        raise ValueError(f"config must be a MoLoRAConfig, got {type(config).__name__}")
    if molora_layers(model):
        raise ValueError("model already has MoLoRA layers; load or train those instead")
    names = find_target_modules(model, config.target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        _set_submodule(model, name, MoLoRALinear(model.get_submodule(name), config))
    model.molora_config = config
    model.molora_targets = names
    return model


def base_state_dict(model: nn.Module) -> dict:
    """The state dict of the model as it was before injection: each MoLoRA layer's base
    tensors under the layer's own name (".base." dropped), its adapter tensors left out."""
    layers = molora_layers(model)
    state = {}
    for key, value in model.state_dict().items():
        owner = next((n for n in layers if key.startswith(n + ".")), None)
        if owner is None:
            state[key] = value
        elif key.startswith(owner + ".base."):
            state[owner + "." + key[len(owner) + len(".base."):]] = value
    return state


def molora_layers(model: nn.Module) -> dict[str, MoLoRALinear]:
    """Every MoLoRALinear of the model by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MoLoRALinear)}


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every MoLoRA layer returns exactly its base layer's output."""
    layers = list(molora_layers(model).values())
    before = [layer.adapters_enabled for layer in layers]
    for layer in layers:
        layer.adapters_enabled = False
    try:
        yield model
    finally:
        for layer, state in zip(layers, before):
            layer.adapters_enabled = state


def last_routing(model: nn.Module) -> dict:
    """Per MoLoRA layer, the routing of its last forward (probs, experts, counts, logits)."""
    return {n: m.last_routing for n, m in molora_layers(model).items() if m.last_routing is not None}


def set_group_bias(model: nn.Module, bias: Optional[dict[str, float]] = None) -> None:
    """Steering: adds bias[group] to the router logits of every expert in that group
    (MoLoRAConfig.expert_groups) in every layer; None resets all biases to zero."""
    config = getattr(model, "molora_config", None)
    if config is None:
        raise ValueError("model has no MoLoRA config (call get_molora_model first)")
    for name in (bias or {}):
        if name not in config.expert_groups:
            raise ValueError(f"unknown expert group {name!r}; groups: {sorted(config.expert_groups)}")
    for layer in molora_layers(model).values():
        layer.logit_bias.zero_()
        for name, value in (bias or {}).items():
            layer.logit_bias[list(config.expert_groups[name])] += float(value)
