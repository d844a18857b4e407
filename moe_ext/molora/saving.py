"""A MoLoRA adapter on a model and its files, without pickle: adapter_config.json (the config,
the wrapped layers, the base model's name or path and class) and adapter_model.safetensors
(lora_A, lora_B and the router of each layer, and the modules_to_save), PEFT's file names.

get_molora_model makes the model's `save_pretrained` write the adapter only (as a PEFT
model does), so that HF Trainer and TRL checkpoints and `save_model` hold the adapter and
reload exactly with load_molora. write_adapter_files is the one function that writes
adapter folders (save_molora and the PEFT conversions in moe_ext.hf.peft go through it),
read_adapter_files the one that reads them.
"""
from __future__ import annotations

import os
import types
from typing import Optional

import torch
from safetensors.torch import save_file
from torch import nn

from ..utils.distributed import (any_sharded, class_name, copy_into, full_shape, full_tensors,
                                 write_once, zero3_gathered)
from ..utils.saved_folder import commit_save, loading, read_verified_config, recorded_sha256
from ..utils.tensors import check_tensor, load_safetensors
from .config import MoLoRAConfig
from .layer import is_conv1d, linear_features, molora_layers
from .model import inject_molora, modules_to_save_parameters, plan_molora
from .quantized import base_quantization

FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def get_molora_model(model: nn.Module, config: MoLoRAConfig) -> nn.Module:
    """Wraps config.target_modules of `model` (any transformers model) in MoLoRALinear
    layers in place, freezes the rest but the modules_to_save, adds the router losses to
    its outputs (`aux_loss`, see outputs.py), makes `model.save_pretrained(dir)` write the
    adapter only (save_molora), and returns the model."""
    inject_molora(model, config)
    if callable(getattr(model, "save_pretrained", None)):
        model.save_pretrained = types.MethodType(_save_pretrained, model)
    return model


def _save_pretrained(model, save_directory: str, state_dict: Optional[dict] = None,
                     is_main_process: bool = True, push_to_hub: bool = False, **kwargs):
    """save_pretrained of a MoLoRA model: the adapter only (save_molora). Other
    transformers options (safe_serialization, max_shard_size, ...) do not apply. A model
    sharded by FSDP2 or ZeRO-3 saves from every rank whatever is_main_process says (the
    gather is a collective; rank 0 writes), unless a gathered state_dict is given."""
    if push_to_hub:
        raise ValueError("save_pretrained(push_to_hub=True) is not supported for MoLoRA "
                         "adapters; save, then upload the folder")
    if state_dict is None and any_sharded(adapter_parameters(model)):
        save_molora(model, save_directory)  # sharded: every rank gathers, rank 0 writes
    elif is_main_process:
        save_molora(model, save_directory, state_dict=state_dict)


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trained parameters themselves, under the model's own state-dict keys:
    <layer>.lora_A, <layer>.lora_B, <layer>.router.weight (a steerable config:
    <layer>.mix_scale and <layer>.mix_proj too), and every modules_to_save parameter."""
    params = {}
    for name, layer in molora_layers(model).items():
        params[f"{name}.lora_A"] = layer.lora_A
        params[f"{name}.lora_B"] = layer.lora_B
        params[f"{name}.router.weight"] = layer.router.weight
        if layer.mix_proj is not None:
            params[f"{name}.mix_scale"] = layer.mix_scale
            params[f"{name}.mix_proj"] = layer.mix_proj
    params.update(modules_to_save_parameters(model))
    return params


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """adapter_parameters, detached (as a state dict holds them)."""
    return {k: p.detach() for k, p in adapter_parameters(model).items()}


def save_molora(model: nn.Module, directory: str, state_dict: Optional[dict] = None,
                tokenizer=None) -> None:
    """Writes directory/adapter_config.json and directory/adapter_model.safetensors (and
    the tokenizer's files, when given) in one step. state_dict: take the tensors from it
    (e.g. a gathered state dict from a Trainer) instead of the model. A quantised base is
    not saved (nor dequantised): the config records its quantisation (`base_quantization`,
    None for a float base). A model sharded by FSDP2 (DTensor parameters) or DeepSpeed
    ZeRO-3 is saved by calling this on every rank: the full tensors are gathered, rank 0
    writes, the other ranks wait until the files are written (moe_ext.utils.distributed)."""
    layers = molora_layers(model)
    if not layers:
        raise ValueError("model has no MoLoRA layers to save (call get_molora_model first)")
    config = getattr(model, "molora_config")
    model_config = getattr(model, "config", None)
    base = (getattr(model_config, "name_or_path", None) or getattr(model, "name_or_path", None)
            or None)
    if isinstance(base, str) and os.path.isdir(base):  # a folder: absolute, whatever the cwd
        base = os.path.abspath(base)
    meta = {"format_version": FORMAT_VERSION, "moe_ext_config": config.to_dict(),
            "layers": sorted(layers), "base_model_class": class_name(model),
            "base_model_name_or_path": base,
            "base_model_source": (None if not isinstance(base, str)
                                  else "folder" if os.path.isabs(base) else "hub"),
            "base_model_type": getattr(model_config, "model_type", None),
            "base_quantization": base_quantization(model),
            "fan_in_fan_out": any(is_conv1d(m.base) for m in layers.values())}
    state = adapter_parameters(model)  # not detached: ZeRO-3's attributes stay
    if state_dict is not None:
        missing = [k for k in state if k not in state_dict]
        if missing:
            raise ValueError(f"state_dict lacks the adapter tensors {missing[:5]}")
        state = {k: state_dict[k] for k in state}
    sharded = any_sharded(state)
    state = full_tensors(state)  # sharded tensors gathered: a collective on every rank
    write_once(lambda: write_adapter_files(directory, meta, state, tokenizer=tokenizer), sharded)


def write_adapter_files(directory: str, meta: dict, tensors: dict[str, torch.Tensor],
                        checksums: bool = True, tokenizer=None) -> None:
    """The one writer of adapter folders (MoLoRA's, and PEFT's when converting), in one
    step (moe_ext.utils.saved_folder: safe with other saves and loads of the folder):
    adapter_model.safetensors (and the tokenizer's files, when given), then
    adapter_config.json recording their SHA-256 (checksums=False: PEFT's config, left as
    PEFT writes it)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}

    def write(path: str) -> None:
        save_file(tensors, path, metadata={"format": "pt"})

    folders = {"": (tokenizer.save_pretrained, False)} if tokenizer is not None else {}
    commit_save(directory, CONFIG_NAME, meta, {WEIGHTS_NAME: write}, folders, checksums=checksums)


def read_adapter_files(directory: str, tensors: bool = True) -> tuple[dict, dict]:
    """The one reader of adapter folders: (adapter_config.json, the tensors of
    adapter_model.safetensors, or {} when tensors=False), the config checked against the
    weights' SHA-256 it records (configs without one, PEFT's or older moe_ext versions',
    are read as they are); FileNotFoundError naming the missing file, ValueError naming
    the file that is not JSON, not safetensors or does not match its checksum."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!r}")
    with loading(directory):  # the config and the weights of one save
        meta = read_verified_config(directory, CONFIG_NAME)
        if not isinstance(meta, dict):
            raise ValueError(f"{path}: not a JSON object")
        return meta, (read_adapter_weights(directory, meta) if tensors else {})


def read_adapter_weights(directory: str, meta: dict) -> dict:
    """The tensors of directory/adapter_model.safetensors, checked against the SHA-256 that
    `meta` (its adapter_config.json) records, if any (FileNotFoundError / ValueError naming
    the file)."""
    weights = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory!r}")
    return load_safetensors(weights, recorded_sha256(meta, WEIGHTS_NAME))


def check_molora_meta(meta: dict, directory: str) -> dict:
    """ValueError unless `meta` is the config of a MoLoRA adapter this version reads, with
    its fields of the right types (each error names the field and the file)."""
    path = os.path.join(directory, CONFIG_NAME)
    if meta.get("peft_type") is not None and "moe_ext_config" not in meta:
        raise ValueError(f"{path} is a PEFT adapter, not a MoLoRA one; convert it with "
                         f"`moe-ext convert --from-peft {directory} --output DIR`")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version!r} is not supported "
                         f"(this moe_ext reads {FORMAT_VERSION})")
    layers = meta.get("layers")
    if not (isinstance(layers, list) and layers and all(isinstance(n, str) and n for n in layers)):
        raise ValueError(f"{path}: field 'layers' must be a list of module names, got {layers!r}")
    for key in ("base_model_class", "base_model_name_or_path", "base_model_type"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise ValueError(f"{path}: field {key!r} must be a string or null, got {meta[key]!r}")
    return meta


def config_from_meta(meta: dict, directory: str) -> MoLoRAConfig:
    """The MoLoRAConfig in `meta`; ValueError naming the file and the field."""
    try:
        return MoLoRAConfig.from_dict(meta.get("moe_ext_config"))
    except (ValueError, TypeError) as err:
        raise ValueError(f"{os.path.join(directory, CONFIG_NAME)}: moe_ext_config: {err}") from None


def read_adapter_meta(directory: str) -> dict:
    """adapter_config.json of a MoLoRA adapter folder; FileNotFoundError / ValueError."""
    return check_molora_meta(read_adapter_files(directory, tensors=False)[0], directory)


def read_molora_config(directory: str) -> MoLoRAConfig:
    return config_from_meta(read_adapter_meta(directory), directory)


def _expected_shapes(model: nn.Module, config: MoLoRAConfig, where: str) -> dict[str, tuple]:
    """The adapter tensors' shapes once `config` is injected into `model`, without injecting
    it: {key: shape} under adapter_state_dict's keys."""
    if molora_layers(model):
        return {k: full_shape(v) for k, v in adapter_parameters(model).items()}
    try:
        config, names, saved = plan_molora(model, config)
        shapes = {}
        for name in names:
            D, O = linear_features(model.get_submodule(name))
            E, R = config.num_experts, config.r
            shapes.update({f"{name}.lora_A": (E, R, D), f"{name}.lora_B": (E, O, R),
                           f"{name}.router.weight": (E + config.num_null_experts, D)})
            if config.steerable:
                shapes.update({f"{name}.mix_scale": (1,), f"{name}.mix_proj": (
                    len(config.expert_groups), E + config.num_null_experts)})
    except ValueError as err:
        raise ValueError(f"{where} does not fit {type(model).__name__}: {err}") from None
    for name in saved:
        shapes.update({f"{name}.{p}": tuple(v.shape)
                       for p, v in model.get_submodule(name).named_parameters()})
    return shapes


def load_molora(model: nn.Module, directory: str) -> nn.Module:
    """Injects MoLoRA layers as saved in `directory` into the base `model` (or, if it has
    them already with the same config, into those) and loads their weights and the
    modules_to_save; ValueError when the saved adapter is invalid (types, ranges, checksum,
    non-finite or non-float tensors) or does not fit the model (another architecture,
    other layers or shapes). Everything is checked before the model is touched, so a
    failed load leaves it as it was. The base may be float or quantised (quantized.py);
    one sharded by FSDP2 or ZeRO-3 loads when every rank calls this (each takes its own
    shard)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no {CONFIG_NAME}: the adapter folder {directory!r} does not exist")
    with loading(directory):  # the config and the weights of one save
        meta, _ = read_adapter_files(directory, tensors=False)  # the config first: cheap
        check_molora_meta(meta, directory)
        config = config_from_meta(meta, directory)
        state = read_adapter_weights(directory, meta)
    where = f"adapter in {directory!r}"
    weights = os.path.join(directory, WEIGHTS_NAME)
    saved_class = meta.get("base_model_class")
    if saved_class and saved_class != class_name(model):
        raise ValueError(f"{where} was trained on a {saved_class} "
                         f"({meta.get('base_model_name_or_path') or 'unnamed base'}) and does "
                         f"not fit a {class_name(model)}")
    if molora_layers(model) and model.molora_config.to_dict() != config.to_dict():
        # e.g. a Trainer resuming: it loads into the layers it has
        raise ValueError(f"the model's MoLoRA adapter has another config than the one in "
                         f"{directory!r}")
    expected = _expected_shapes(model, config, where)
    have = sorted({k.rsplit(".", 1)[0] for k in expected if k.endswith(".lora_A")})
    if have != sorted(meta["layers"]):
        missing, extra = sorted(set(meta["layers"]) - set(have)), sorted(set(have) - set(meta["layers"]))
        raise ValueError(f"{where} does not fit {type(model).__name__}: "
                         f"saved layers missing from the model: {missing[:5]}, model layers "
                         f"not in the adapter: {extra[:5]}")
    for key, shape in expected.items():
        if key not in state:
            raise ValueError(f"{weights}: missing tensor {key!r}")
        check_tensor(weights, key, state[key], shape)
    if not molora_layers(model):
        get_molora_model(model, config)
    params = adapter_parameters(model)
    with torch.no_grad(), zero3_gathered(params.values(), modifier_rank=0):
        for key, tensor in params.items():
            copy_into(tensor, state[key])  # a sharded (FSDP2) tensor takes its own shard
    return model
