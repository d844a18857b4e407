"""MoLoRA inside any model: inject into target modules, freeze the rest (but the
modules_to_save), turn adapters off (the DPO reference for free), read the routing, steer
it. get_molora_model and the adapter files are in saving.py."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from typing import Iterator, Optional, Union

import torch
from torch import nn

from .config import MoLoRAConfig
from .layer import MoLoRALinear, is_conv1d, mix_override, molora_layers
from .outputs import install_router_outputs


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


def _linear_suffixes(model: nn.Module) -> str:
    names = sorted({n.split(".")[-1] for n, m in model.named_modules() if n and _is_linear(m)})
    return ", ".join(names) or "(none)"


class TargetModulesError(ValueError):
    """target_modules that match no linear module of the model."""


def find_target_modules(model: nn.Module, target_modules: Union[str, list[str], None]) -> list[str]:
    """Names of the linear modules to wrap, in PEFT's forms: a list of name suffixes
    ("q_proj" matches "model.layers.0.self_attn.q_proj"), a single string used as a regex
    that must match the whole name, or "all-linear" (every nn.Linear / Conv1D but the
    output head). ValueError when nothing matches or a listed name matches nothing."""
    if target_modules is None:
        raise ValueError("MoLoRAConfig.target_modules must be set: a list of module-name "
                         "suffixes, a regex string, or 'all-linear'")
    heads = _output_embedding_names(model)
    names, used = [], set()
    for name, module in model.named_modules():
        if not name or not _is_linear(module) or isinstance(module, MoLoRALinear):
            continue
        if target_modules == "all-linear":
            hit = name not in heads
        elif isinstance(target_modules, str):
            hit = re.fullmatch(target_modules, name) is not None
        else:
            found = [t for t in target_modules if _matches(name, t)]
            used.update(found)
            hit = bool(found)
        if hit:
            names.append(name)
    unused = [t for t in target_modules if t not in used] if isinstance(target_modules, list) else []
    if not names or unused:
        what = f"entries {unused}" if unused else repr(target_modules)
        raise TargetModulesError(f"target_modules {what} matched no nn.Linear or Conv1D module of "
                         f"{type(model).__name__}; its linear modules: {_linear_suffixes(model)}")
    return names


def _matches(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def default_modules_to_save(model: nn.Module) -> list[str]:
    """The head of a sequence- or token-classification model ("score" or "classifier"),
    trained and saved with the adapter as in PEFT's SEQ_CLS task; [] otherwise."""
    if not type(model).__name__.endswith(("ForSequenceClassification", "ForTokenClassification")):
        return []
    return [n for n in ("score", "classifier") if isinstance(getattr(model, n, None), nn.Module)]


def find_modules_to_save(model: nn.Module, modules_to_save: list[str]) -> list[str]:
    """Full names of the modules matching each modules_to_save entry (by suffix)."""
    found = []
    for key in modules_to_save:
        hits = [n for n, _ in model.named_modules() if n and _matches(n, key)]
        if not hits:
            raise ValueError(f"modules_to_save entry {key!r} matches no module of "
                             f"{type(model).__name__}")
        found += hits
    return sorted(set(found))


class _Originals:
    """The base values of the modules_to_save parameters, swapped in by disable_adapters so
    that the adapters-off model is exactly the base. They are non-persistent buffers of the
    model itself (molora_original_<i>), so they follow its .to() / .half(), and this plain
    object only maps parameter names to them: a child module would be called as a layer
    by containers that run every child (nn.Sequential)."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor]):
        self.model = model
        self.names = {}
        for i, (name, value) in enumerate(params.items()):
            model.register_buffer(f"molora_original_{i}", value.detach().clone(), persistent=False)
            self.names[name] = f"molora_original_{i}"

    def get(self, name: str) -> torch.Tensor:
        return getattr(self.model, self.names[name])


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def plan_molora(model: nn.Module, config: MoLoRAConfig) -> tuple[MoLoRAConfig, list[str], list[str]]:
    """What inject_molora would do, without touching the model: (the config with
    modules_to_save resolved, the names of the modules to wrap, the modules_to_save);
    ValueError when no target module matches."""
    keep = config.modules_to_save if config.modules_to_save is not None else default_modules_to_save(model)
    config = dataclasses.replace(config, modules_to_save=list(keep))
    saved = find_modules_to_save(model, keep)
    names = [n for n in find_target_modules(model, config.target_modules)
             if not any(n == s or n.startswith(s + ".") for s in saved)]
    return config, names, saved


def inject_molora(model: nn.Module, config: MoLoRAConfig) -> nn.Module:
    """Wraps config.target_modules of `model` in MoLoRALinear layers in place, freezes every
    other parameter but those of modules_to_save (None: default_modules_to_save), stores
    the config (with modules_to_save resolved) as `model.molora_config` and adds the
    router-loss outputs (outputs.py). get_molora_model (saving.py) also makes
    save_pretrained write the adapter."""
    if not isinstance(config, MoLoRAConfig):
        raise ValueError(f"config must be a MoLoRAConfig, got {type(config).__name__}")
    if molora_layers(model):
        raise ValueError("model already has MoLoRA layers; load or train those instead")
    config, names, saved = plan_molora(model, config)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        _set_submodule(model, name, MoLoRALinear(model.get_submodule(name), config))
    trained = {}
    for name in saved:
        for pname, p in model.get_submodule(name).named_parameters():
            p.requires_grad_(True)
            trained[f"{name}.{pname}"] = p
    model.molora_originals = _Originals(model, trained)
    model.molora_config = config
    model.molora_targets = names
    model.molora_saved_modules = saved
    install_router_outputs(model)
    return model


def modules_to_save_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trained parameters of the modules_to_save, by full name."""
    names = getattr(getattr(model, "molora_originals", None), "names", {})
    return {n: model.get_parameter(n) for n in names}


def base_state_dict(model: nn.Module, keep_vars: bool = False) -> dict:
    """The state dict of the model as it was before injection: each MoLoRA layer's base
    tensors under the layer's own name (".base." dropped), its adapter tensors left out,
    the modules_to_save at their base values. keep_vars: the parameters themselves, as
    nn.Module.state_dict(keep_vars=True) gives them."""
    layers = molora_layers(model)
    originals = getattr(model, "molora_originals", None)
    state = {}
    for key, value in model.state_dict(keep_vars=keep_vars).items():
        if originals is not None and key in originals.names:
            value = originals.get(key)
        owner = next((n for n in layers if key.startswith(n + ".")), None)
        if owner is None:
            state[key] = value
        elif key.startswith(owner + ".base."):
            state[owner + "." + key[len(owner) + len(".base."):]] = value
    return state


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model is exactly its base: every MoLoRA layer returns its base
    layer's output and the modules_to_save hold their base values."""
    layers = list(molora_layers(model).values())
    before = [layer.adapters_enabled for layer in layers]
    trained = modules_to_save_parameters(model)
    kept = {name: p.data for name, p in trained.items()}
    for layer in layers:
        layer.adapters_enabled = False
    for name, p in trained.items():
        p.data = model.molora_originals.get(name)
    try:
        yield model
    finally:
        for layer, state in zip(layers, before):
            layer.adapters_enabled = state
        for name, p in trained.items():
            p.data = kept[name]


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


Mix = Union[dict, torch.Tensor]


def mix_tensor(model: nn.Module, mix: Mix, name: str = "mix") -> torch.Tensor:
    """A preference mix as rows on the simplex over the model's expert groups: a dict
    {group: weight >= 0} (groups left out get 0) -> (1, G); a tensor (G,) or (B, G) in the
    groups' order (MoLoRAConfig.expert_groups) -> (1, G) or (B, G); each row divided by its
    sum. ValueError naming `name` for an unknown group, a negative, NaN or infinite weight,
    an all-zero row, or a wrong shape."""
    config = getattr(model, "molora_config", None)
    if config is None or not config.expert_groups:
        raise ValueError(f"{name}: the model has no expert groups to mix (a PMoL adapter has)")
    return mix_rows(list(config.expert_groups), mix, name)


def mix_rows(groups: list[str], mix: Mix, name: str = "mix") -> torch.Tensor:
    """mix_tensor for a list of group names (G): (1, G) or (B, G) float32 rows on the
    simplex in the order of `groups`, with mix_tensor's checks and errors."""
    if isinstance(mix, dict):
        unknown = [g for g in mix if g not in groups]
        if unknown:
            raise ValueError(f"{name} names unknown groups {unknown}; groups: {groups}")
        for g, w in mix.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise ValueError(f"{name}: the weight of {g!r} must be a finite number, got {w!r}")
        lam = torch.tensor([[float(mix.get(g, 0.0)) for g in groups]], dtype=torch.float32)
    elif isinstance(mix, torch.Tensor):
        lam = mix.detach().to(torch.float32)
        lam = lam[None] if lam.dim() == 1 else lam
        if lam.dim() != 2 or lam.shape[1] != len(groups):
            raise ValueError(f"{name} must have shape ({len(groups)},) or (B, {len(groups)}) "
                             f"(groups {groups}), got {tuple(mix.shape)}")
        if not torch.isfinite(lam).all():
            raise ValueError(f"{name} weights must be finite numbers, got {mix.tolist()}")
    else:
        raise ValueError(f"{name} must be a dict {{group: weight}} or a tensor, got "
                         f"{type(mix).__name__}")
    if (lam < 0).any():
        raise ValueError(f"{name} weights must be >= 0, got {_mix_text(lam, groups)}")
    if (lam.sum(-1) <= 0).any():
        raise ValueError(f"{name} weights must not all be zero (groups: {groups})")
    return lam / lam.sum(-1, keepdim=True)


def _mix_text(lam: torch.Tensor, groups: list[str]) -> str:
    return "; ".join(", ".join(f"{g}={w:g}" for g, w in zip(groups, row)) for row in lam.tolist())


def is_steerable(model: nn.Module) -> bool:
    """Whether the model's routers take a preference mix (MoLoRAConfig.steerable)."""
    config = getattr(model, "molora_config", None)
    return bool(config is not None and config.steerable)


@contextlib.contextmanager
def preference_mix(model: nn.Module, mix: Optional[Mix], name: str = "mix") -> Iterator[None]:
    """Inside the block the steerable model (MoLoRAConfig.steerable) routes with the
    preference mix `mix` (see mix_tensor: a dict {group: weight} or a (G,) / (B, G) tensor,
    one row per batch row); None: the prompt alone decides, as a model that is not
    steerable. ValueError naming `name` for a bad mix or a model that is not steerable
    (steer that one with set_group_bias)."""
    if mix is None:
        with mix_override(None):
            yield
        return
    if not is_steerable(model):
        raise ValueError(f"{name}: the model's routers do not take a preference mix (its "
                         "MoLoRAConfig.steerable is false); steer it with set_group_bias")
    lam = mix_tensor(model, mix, name).to(next(model.parameters()).device)
    with mix_override(lam):
        yield
