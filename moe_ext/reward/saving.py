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

import torch
from safetensors.torch import save_file
from torch import nn

from ..molora import (MoLoRAConfig, adapter_parameters, adapter_state_dict, base_state_dict,
                      molora_layers)
from ..molora.quantized import quantized_modules
from ..utils.distributed import any_sharded, class_name, full_tensors, write_once
from ..utils.io import write_json
from ..utils.saved_folder import commit_save, loading, read_verified_config, recorded_sha256
from ..utils.tensors import check_tensor, load_safetensors
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


def save_reward_model(model: nn.Module, directory: str, save_backbone: Optional[bool] = None,
                      extra_json: Optional[dict] = None) -> None:
    """Writes a SparseMoERewardModel or a BackboneRewardModel to `directory` (see the module
    docstring) in one step (moe_ext.utils.saved_folder: reward_config.json, written last,
    records the SHA-256 of the weights). save_backbone (backbone mode): True writes the
    backbone's base weights to directory/backbone; None (default) does so only when the
    model records no backbone name or path; False never (then trained backbone weights go
    with the head). extra_json: {file name: JSON value} saved in the same step (e.g.
    train_info.json). A model sharded by FSDP2 or ZeRO-3 is saved by calling this on every
    rank: the full tensors are gathered, rank 0 writes, the others wait
    (moe_ext.utils.distributed).
    A quantised backbone (QLoRA) is never written: it reloads from its name."""
    if isinstance(model, SparseMoERewardModel):
        state = model.state_dict(keep_vars=True)  # the parameters: ZeRO-3's attributes stay
        sharded = any_sharded(state)
        state = full_tensors(state)  # a collective when sharded
        write_once(lambda: _commit(directory, state, {"class": class_name(model),
                                                      "config": model.config.to_dict()},
                                   extra_json=extra_json), sharded)
        return
    if not isinstance(model, BackboneRewardModel):
        raise ValueError(f"save_reward_model saves a SparseMoERewardModel or a "
                         f"BackboneRewardModel, got {type(model).__name__}")
    full = save_backbone if save_backbone is not None else not model.config.backbone
    if full is False and not model.config.backbone:
        raise ValueError("save_backbone=False needs a backbone name or path to reload from, "
                         "and this model's backbone was built in memory")
    if full:
        quantized = quantized_modules(model.backbone)
        if quantized:
            raise ValueError(f"save_backbone writes the backbone's base weights, but they are "
                             f"quantised ({len(quantized)} layers, e.g. "
                             f"{next(iter(quantized.values()))}); save with save_backbone=False "
                             f"and a backbone name or path to reload it from")
    # the parameters themselves (keep_vars), not detached copies: ZeRO-3's attributes stay
    state = {f"head.{k}": v for k, v in model.head.state_dict(keep_vars=True).items()}
    state.update({f"backbone.{k}": v for k, v in adapter_parameters(model.backbone).items()})
    trained = {} if full else _trained_backbone_tensors(model)
    state.update(trained)
    base = base_state_dict(model.backbone, keep_vars=True) if full else {}
    sharded = any_sharded(state) or any_sharded(base)
    state, base = full_tensors(state), full_tensors(base)  # collectives when sharded
    write_once(lambda: _write_backbone_model(model, directory, state, base, full, sorted(trained),
                                             extra_json), sharded)


def _write_backbone_model(model: BackboneRewardModel, directory: str, state: dict, base: dict,
                          full: bool, trained: list, extra_json: Optional[dict]) -> None:
    """The files of a BackboneRewardModel: backbone/ (`base`, when `full`), tokenizer/, the
    weights (`state`) and reward_config.json, in one step (_commit)."""
    layers = molora_layers(model.backbone)
    folders = {}
    if full:  # files whose bytes did not change are left alone (a frozen backbone)
        # the class's own save_pretrained: get_molora_model's would write the adapter only
        folders[BACKBONE_DIR] = (lambda tmp: type(model.backbone).save_pretrained(
            model.backbone, tmp, state_dict=base), True)
    if model.tokenizer is not None:
        folders[TOKENIZER_DIR] = (model.tokenizer.save_pretrained, True)
    molora = getattr(model.backbone, "molora_config", None) if layers else None
    _commit(directory, state, {
        "class": "BackboneRewardModel", "config": model.config.to_dict(),
        "backbone_saved": bool(full), "molora_config": molora.to_dict() if molora is not None else None,
        "molora_layers": sorted(layers), "trained_backbone_tensors": trained}, folders,
        extra_json)


def _commit(directory: str, state: dict, meta: dict, folders: Optional[dict] = None,
            extra_json: Optional[dict] = None) -> None:
    """reward_model.safetensors, the extra JSON files and `folders` (commit_save's), then
    reward_config.json with the checksums of every file, in one step."""
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    files = {WEIGHTS_NAME: lambda path: save_file(state, path)}
    for name, value in (extra_json or {}).items():
        files[name] = lambda path, value=value: write_json(path, value)
    commit_save(directory, CONFIG_NAME, {"format_version": FORMAT_VERSION, **meta}, files,
                folders)


def read_reward_meta(directory: str) -> dict:
    """reward_config.json, verified against the weights' checksum and checked field by
    field; FileNotFoundError / ValueError naming the file."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!r}")
    if not os.path.isfile(os.path.join(directory, WEIGHTS_NAME)):
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory!r}")
    meta = read_verified_config(directory, CONFIG_NAME)
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: not a JSON object")
    kind = meta.get("class")
    if meta.get("format_version") != FORMAT_VERSION or kind not in ("SparseMoERewardModel",
                                                                     "BackboneRewardModel"):
        raise ValueError(f"{path}: not a moe_ext reward model checkpoint (format 1)")
    config_class = RewardConfig if kind == "SparseMoERewardModel" else BackboneConfig
    try:
        meta["config"] = config_class.from_dict(meta.get("config"))
        if kind == "BackboneRewardModel":
            molora = meta.get("molora_config")
            meta["molora_config"] = MoLoRAConfig.from_dict(molora) if molora else None
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: {err}") from None
    if kind == "BackboneRewardModel":
        for key in ("molora_layers", "trained_backbone_tensors"):
            value = meta.get(key, [])
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise ValueError(f"{path}: field {key!r} must be a list of names, got {value!r}")
        if not isinstance(meta.get("backbone_saved", False), bool):
            raise ValueError(f"{path}: field 'backbone_saved' must be true or false")
    return meta


def _checked_state(weights: str, expected: dict, meta: dict) -> dict:
    """The tensors of `weights` (the bytes checked against the SHA-256 in `meta`, the
    config), each checked (float, finite, and the shape in `expected` for the keys it
    has); ValueError naming the file and the tensor."""
    state = load_safetensors(weights, recorded_sha256(meta, WEIGHTS_NAME))
    for key, tensor in state.items():
        check_tensor(weights, key, tensor, expected.get(key))
    return state


def load_reward_model(directory: str, backbone: Optional[str] = None) -> nn.Module:
    """The model saved by save_reward_model in `directory`. backbone (backbone mode) names
    or points to the backbone to load instead of the recorded one (a moved folder)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no {CONFIG_NAME}: the reward model folder {directory!r} does not exist")
    with loading(directory):  # every file read comes from one save
        return _load_reward_model(directory, backbone)


def _load_reward_model(directory: str, backbone: Optional[str]) -> nn.Module:
    meta = read_reward_meta(directory)
    path, weights = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    if meta["class"] == "SparseMoERewardModel":
        with torch.device("meta"):  # the shapes, before allocating anything
            shapes = {k: tuple(v.shape) for k, v in
                      SparseMoERewardModel.from_config(meta["config"]).state_dict().items()}
        state = _checked_state(weights, shapes, meta)
        if sorted(state) != sorted(shapes):
            raise ValueError(f"{weights}: tensors {sorted(set(state) ^ set(shapes))[:5]} do not "
                             f"fit the config in {path}")
        model = SparseMoERewardModel.from_config(meta["config"])
        model.load_state_dict(state)
        return model

    cfg = meta["config"]
    source = os.path.join(directory, BACKBONE_DIR) if meta.get("backbone_saved") else \
        (backbone or cfg.backbone)
    tokenizer_dir = os.path.join(directory, TOKENIZER_DIR)
    state = _checked_state(weights, {}, meta)
    net, tokenizer = load_backbone(source, cfg.backbone_class,
                                   tokenizer_dir if os.path.isdir(tokenizer_dir) else None)
    prepare_backbone(net, meta["molora_config"])
    if sorted(molora_layers(net)) != sorted(meta.get("molora_layers", [])):
        raise ValueError(f"{path}: the MoLoRA layers saved do not fit backbone {source!r}")
    model = BackboneRewardModel(net, cfg.num_experts, cfg.top_k, cfg.expert_hidden, cfg.pooling,
                                tokenizer, cfg.max_length, cfg.router_temperature, cfg.backbone)
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
