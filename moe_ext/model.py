"""MoLoRA inside any model: inject into target modules, freeze the rest, save and load the
adapter without pickle, turn adapters off (the DPO reference for free), read the routing,
steer it."""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from typing import Iterator, Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import MoLoRAConfig
from .layers import MoLoRALinear, is_conv1d

FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


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


def molora_layers(model: nn.Module) -> dict[str, MoLoRALinear]:
    """Every MoLoRALinear of the model by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MoLoRALinear)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable adapter tensors: <layer>.lora_A, <layer>.lora_B, <layer>.router.weight."""
    state = {}
    for name, layer in molora_layers(model).items():
        state[f"{name}.lora_A"] = layer.lora_A.detach()
        state[f"{name}.lora_B"] = layer.lora_B.detach()
        state[f"{name}.router.weight"] = layer.router.weight.detach()
    return state


def atomic_write(path: str, write) -> None:
    """Calls write(tmp_path) on a temporary file beside `path`, then renames it over `path`
    so readers never see a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_molora(model: nn.Module, directory: str) -> None:
    """Writes directory/adapter_config.json and directory/adapter_model.safetensors."""
    layers = molora_layers(model)
    if not layers:
        raise ValueError("model has no MoLoRA layers to save (call get_molora_model first)")
    config = getattr(model, "molora_config")
    meta = {"format_version": FORMAT_VERSION, "moe_ext_config": config.to_dict(),
            "layers": sorted(layers), "base_model_class": type(model).__name__}
    state = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    atomic_write(os.path.join(directory, WEIGHTS_NAME),
                 lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_write(os.path.join(directory, CONFIG_NAME),
                 lambda tmp: open(tmp, "w").write(json.dumps(meta, indent=2)))


def read_molora_config(directory: str) -> MoLoRAConfig:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!r}")
    meta = json.load(open(path))
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version!r} is not supported "
                         f"(this moe_ext reads {FORMAT_VERSION})")
    return MoLoRAConfig.from_dict(meta["moe_ext_config"])


def load_molora(model: nn.Module, directory: str) -> nn.Module:
    """Injects MoLoRA layers as saved in `directory` into the base `model` and loads their
    weights; ValueError when the saved adapter does not fit the model."""
    config = read_molora_config(directory)
    weights = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory!r}")
    saved = json.load(open(os.path.join(directory, CONFIG_NAME)))["layers"]
    state = load_file(weights)
    try:
        get_molora_model(model, config)
    except ValueError as err:
        raise ValueError(f"adapter in {directory!r} does not fit {type(model).__name__}: {err}")
    have = sorted(molora_layers(model))
    if have != sorted(saved):
        missing, extra = sorted(set(saved) - set(have)), sorted(set(have) - set(saved))
        raise ValueError(f"adapter in {directory!r} does not fit {type(model).__name__}: "
                         f"saved layers missing from the model: {missing[:5]}, model layers "
                         f"not in the adapter: {extra[:5]}")
    own = adapter_state_dict(model)
    for key, tensor in own.items():
        if key not in state:
            raise ValueError(f"{weights}: missing tensor {key!r}")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise ValueError(f"{weights}: {key} has shape {tuple(state[key].shape)} but the "
                             f"model expects {tuple(tensor.shape)}")
    with torch.no_grad():
        for key, tensor in own.items():
            tensor.copy_(state[key])
    return model


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
