"""Saving and loading reward models without pickle, each in one function.

Embedding mode (SparseMoERewardModel): reward_config.json (the RewardConfig) and
reward_model.safetensors (the weights).

Backbone mode (BackboneRewardModel): reward_config.json (the BackboneConfig, with the
backbone's name or path, its MoLoRA config and layers), reward_model.safetensors (the MoE
head, the MoLoRA adapter tensors and any backbone weight that was trained), tokenizer/
(the tokenizer's own files) and, when the backbone has no name or path to reload it from
or when asked, backbone/ (the backbone's base weights, transformers' save_pretrained).
"""
from __future__ import annotations

import os
from typing import Optional

from safetensors.torch import load_file, save_file
from torch import nn

from ..molora import MoLoRAConfig, adapter_state_dict, base_state_dict, molora_layers
from ..utils.io import atomic_write, read_json, write_json
from .backbone import BackboneConfig, BackboneRewardModel, load_backbone, prepare_backbone
from .model import RewardConfig, SparseMoERewardModel

FORMAT_VERSION = 1
CONFIG_NAME = "reward_config.json"
WEIGHTS_NAME = "reward_model.safetensors"
BACKBONE_DIR = "backbone"
TOKENIZER_DIR = "tokenizer"


def _trained_backbone_tensors(model: BackboneRewardModel) -> dict:
    """Backbone parameters that train (fine-tuning), MoLoRA adapter tensors aside."""
    adapter = {f"backbone.{k}" for k in adapter_state_dict(model.backbone)}
    return {f"backbone.{n}": p for n, p in model.backbone.named_parameters()
            if p.requires_grad and f"backbone.{n}" not in adapter}


def save_reward_model(model: nn.Module, directory: str, save_backbone: Optional[bool] = None) -> None:
    """Writes a SparseMoERewardModel or a BackboneRewardModel to `directory` (see the module
    docstring). save_backbone (backbone mode): True writes the backbone's base weights to
    directory/backbone; None (default) does so only when the model records no backbone
    name or path; False never (then trained backbone weights go with the head)."""
    if isinstance(model, SparseMoERewardModel):
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda t: save_file(state, t))
        write_json(os.path.join(directory, CONFIG_NAME),
                   {"format_version": FORMAT_VERSION, "class": type(model).__name__,
                    "config": model.config.to_dict()})
        return
    if not isinstance(model, BackboneRewardModel):
        raise ValueError(f"save_reward_model saves a SparseMoERewardModel or a "
                         f"BackboneRewardModel, got {type(model).__name__}")
    full = save_backbone if save_backbone is not None else not model.config.backbone
    if full is False and not model.config.backbone:
        raise ValueError("save_backbone=False needs a backbone name or path to reload from, "
                         "and this model's backbone was built in memory")
    layers = molora_layers(model.backbone)
    state = {f"head.{k}": v for k, v in model.head.state_dict().items()}
    state.update({f"backbone.{k}": v for k, v in adapter_state_dict(model.backbone).items()})
    trained = {} if full else _trained_backbone_tensors(model)
    state.update(trained)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if full:
        model.backbone.save_pretrained(os.path.join(directory, BACKBONE_DIR),
                                       state_dict=base_state_dict(model.backbone))
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(os.path.join(directory, TOKENIZER_DIR))
    atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda t: save_file(state, t))
    molora = getattr(model.backbone, "molora_config", None) if layers else None
    write_json(os.path.join(directory, CONFIG_NAME), {
        "format_version": FORMAT_VERSION, "class": "BackboneRewardModel",
        "config": model.config.to_dict(), "backbone_saved": bool(full),
        "molora_config": molora.to_dict() if molora is not None else None,
        "molora_layers": sorted(layers), "trained_backbone_tensors": sorted(trained)})


def load_reward_model(directory: str, backbone: Optional[str] = None) -> nn.Module:
    """The model saved by save_reward_model in `directory`. backbone (backbone mode) names
    or points to the backbone to load instead of the recorded one (a moved folder)."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!r}")
    meta = read_json(path)
    kind = meta.get("class") if isinstance(meta, dict) else None
    if meta.get("format_version") != FORMAT_VERSION or kind not in ("SparseMoERewardModel",
                                                                     "BackboneRewardModel"):
        raise ValueError(f"{path}: not a moe_ext reward model checkpoint (format 1)")
    weights = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory!r}")
    if kind == "SparseMoERewardModel":
        model = SparseMoERewardModel.from_config(RewardConfig.from_dict(meta["config"]))
        model.load_state_dict(load_file(weights))
        return model

    cfg = BackboneConfig.from_dict(meta["config"])
    source = os.path.join(directory, BACKBONE_DIR) if meta.get("backbone_saved") else \
        (backbone or cfg.backbone)
    tokenizer_dir = os.path.join(directory, TOKENIZER_DIR)
    net, tokenizer = load_backbone(source, cfg.backbone_class,
                                   tokenizer_dir if os.path.isdir(tokenizer_dir) else None)
    molora = MoLoRAConfig.from_dict(meta["molora_config"]) if meta.get("molora_config") else None
    prepare_backbone(net, molora)
    if sorted(molora_layers(net)) != sorted(meta.get("molora_layers", [])):
        raise ValueError(f"{path}: the MoLoRA layers saved do not fit backbone {source!r}")
    model = BackboneRewardModel(net, cfg.num_experts, cfg.top_k, cfg.expert_hidden, cfg.pooling,
                                tokenizer, cfg.max_length, cfg.router_temperature, cfg.backbone)
    state = load_file(weights)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # tensor shapes that differ
        raise ValueError(f"{weights} does not fit backbone {source!r}: "
                         f"{str(err).splitlines()[-1].strip()}") from None
    missing_head = [k for k in result.missing_keys if k.startswith("head.")]
    if result.unexpected_keys or missing_head:
        raise ValueError(f"{weights} does not fit backbone {source!r}: unexpected "
                         f"{result.unexpected_keys[:5]}, missing {missing_head[:5]}")
    return model.eval()
