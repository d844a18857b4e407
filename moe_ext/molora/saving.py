"""Saving and loading a MoLoRA adapter without pickle: adapter_config.json (the config and
the wrapped layers) and adapter_model.safetensors (lora_A, lora_B and the router of each
layer), PEFT's file names."""
from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..utils.io import atomic_write, read_json, write_json
from .config import MoLoRAConfig
from .model import get_molora_model, molora_layers

FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable adapter tensors: <layer>.lora_A, <layer>.lora_B, <layer>.router.weight."""
    state = {}
    for name, layer in molora_layers(model).items():
        state[f"{name}.lora_A"] = layer.lora_A.detach()
        state[f"{name}.lora_B"] = layer.lora_B.detach()
        state[f"{name}.router.weight"] = layer.router.weight.detach()
    return state


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
    write_json(os.path.join(directory, CONFIG_NAME), meta)


def read_molora_config(directory: str) -> MoLoRAConfig:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!r}")
    meta = read_json(path)
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
    saved = read_json(os.path.join(directory, CONFIG_NAME))["layers"]
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
