"""PEFT LoRA adapters in and out, exactly, on the files alone (no base model, no `peft`
import):

- peft_to_molora: a PEFT LoRA adapter -> a one-expert MoLoRA adapter (E=1, K=1, no null
  expert: the router's one choice has weight 1, so the layer is the LoRA exactly);
- molora_to_peft: back, for a one-expert adapter without null experts;
- pmol_adapter_from_peft: N per-preference PEFT LoRAs -> a PMoL adapter whose expert
  groups start as those LoRAs (each group's experts are copies of its LoRA; ranks padded
  with zeros and B rescaled so that every expert's s * B A equals its LoRA's), to train
  from (`train-pmol --init-adapter`).

PEFT's file layout: adapter_config.json (peft_type "LORA", r, lora_alpha, ...) and
adapter_model.safetensors with base_model.model.<layer>.lora_A.weight (R, D),
.lora_B.weight (O, R) and base_model.model.<module>.<param> for modules_to_save.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..molora import MoLoRAConfig, read_adapter_files, write_adapter_files
from ..molora.saving import FORMAT_VERSION, check_molora_meta, config_from_meta

PREFIX = "base_model.model."
UNSUPPORTED = {"use_dora": "DoRA", "lora_bias": "LoRA bias", "use_qalora": "QA-LoRA",
               "target_parameters": "target_parameters", "trainable_token_indices":
               "trainable tokens", "layer_replication": "layer replication"}
TASK_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
                "TOKEN_CLS": "AutoModelForTokenClassification"}


@dataclass
class PeftLoRA:
    """A PEFT LoRA adapter read from its folder: per layer A (R, D) and B (O, R), the
    scaling s, and the modules_to_save tensors (by the model's own keys)."""
    config: dict
    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    saved: dict[str, torch.Tensor]
    scaling: float

    @property
    def r(self) -> int:
        return int(self.config["r"])


def read_peft_lora(directory: str) -> PeftLoRA:
    """Reads and checks a PEFT LoRA folder; ValueError naming what moe_ext cannot convert."""
    config, tensors = read_adapter_files(directory)
    where = f"PEFT adapter in {directory!r}"
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type must be LORA, got {config.get('peft_type')!r}")
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            raise ValueError(f"{where}: {what} ({key}) cannot be converted")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{where}: bias={config['bias']!r} cannot be converted (only 'none')")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{where}: per-layer rank_pattern / alpha_pattern cannot be converted")
    A, B, saved = {}, {}, {}
    for key, value in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if name.endswith(".lora_A.weight"):
            A[name[:-len(".lora_A.weight")]] = value
        elif name.endswith(".lora_B.weight"):
            B[name[:-len(".lora_B.weight")]] = value
        elif "lora_" in name:
            raise ValueError(f"{where}: tensor {key!r} is not a linear layer's LoRA (e.g. an "
                             f"embedding LoRA) and cannot be converted")
        else:
            saved[name] = value
    if not A or sorted(A) != sorted(B):
        raise ValueError(f"{where}: needs lora_A and lora_B for the same layers")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return PeftLoRA(config, A, B, saved, scaling)


def _saved_modules(saved: dict) -> list[str]:
    return sorted({k.rsplit(".", 1)[0] for k in saved})


def _molora_meta(config: MoLoRAConfig, layers, peft_config: dict) -> dict:
    task = peft_config.get("task_type")
    return {"format_version": FORMAT_VERSION, "moe_ext_config": config.to_dict(),
            "layers": sorted(layers), "base_model_class": None,
            "base_model_auto_class": TASK_CLASSES.get(task),
            "base_model_name_or_path": peft_config.get("base_model_name_or_path"),
            "base_model_type": None, "fan_in_fan_out": bool(peft_config.get("fan_in_fan_out"))}


def peft_to_molora(peft_dir: str, output: str) -> None:
    """Writes the PEFT LoRA in `peft_dir` as a one-expert MoLoRA adapter to `output`."""
    lora = read_peft_lora(peft_dir)
    layers = sorted(lora.A)
    config = MoLoRAConfig(r=lora.r, lora_alpha=lora.scaling * lora.r, num_experts=1, top_k=1,
                          lora_dropout=float(lora.config.get("lora_dropout", 0.0)),
                          target_modules=layers, modules_to_save=_saved_modules(lora.saved),
                          router_aux_loss_coef=0.0)
    tensors = dict(lora.saved)
    for name in layers:
        tensors[f"{name}.lora_A"] = lora.A[name][None]
        tensors[f"{name}.lora_B"] = lora.B[name][None]
        tensors[f"{name}.router.weight"] = torch.zeros(1, lora.A[name].shape[1], dtype=lora.A[name].dtype)
    write_adapter_files(output, _molora_meta(config, layers, lora.config), tensors)


def _task_type(base_class) -> str:
    for task, suffix in (("CAUSAL_LM", "ForCausalLM"), ("SEQ_CLS", "ForSequenceClassification"),
                         ("TOKEN_CLS", "ForTokenClassification")):
        if base_class and base_class.endswith(suffix):
            return task
    return None


def molora_to_peft(molora_dir: str, output: str) -> None:
    """Writes the one-expert MoLoRA adapter in `molora_dir` (no null experts) as a PEFT
    LoRA adapter to `output`; ValueError for a mixture."""
    meta, tensors = read_adapter_files(molora_dir)
    check_molora_meta(meta, molora_dir)
    config = config_from_meta(meta, molora_dir)
    if config.num_experts != 1 or config.num_null_experts != 0:
        raise ValueError(f"adapter in {molora_dir!r} has {config.num_experts} experts and "
                         f"{config.num_null_experts} null experts; only a one-expert adapter "
                         "without null experts is a plain LoRA")
    out, layers = {}, meta["layers"]
    for name in layers:
        out[f"{PREFIX}{name}.lora_A.weight"] = tensors[f"{name}.lora_A"][0]
        out[f"{PREFIX}{name}.lora_B.weight"] = tensors[f"{name}.lora_B"][0]
    saved = {k: v for k, v in tensors.items() if not k.startswith(tuple(n + "." for n in layers))}
    out.update({PREFIX + k: v for k, v in saved.items()})
    peft_config = {"peft_type": "LORA", "r": config.r, "lora_alpha": config.lora_alpha,
                   "lora_dropout": config.lora_dropout, "target_modules": sorted(layers),
                   "bias": "none", "fan_in_fan_out": bool(meta.get("fan_in_fan_out")),
                   "modules_to_save": _saved_modules(saved) or None, "use_rslora": False,
                   "use_dora": False, "task_type": _task_type(meta.get("base_model_class")),
                   "base_model_name_or_path": meta.get("base_model_name_or_path"),
                   "inference_mode": True, "init_lora_weights": True}
    write_adapter_files(output, peft_config, out, checksums=False)  # PEFT reads it


def pmol_adapter_from_peft(peft_dirs: dict[str, str], output: str, experts_per_group: int = 1,
                           num_null_experts: int = 1, top_k: int = 2, seed: int = 0,
                           **config_kwargs) -> MoLoRAConfig:
    """Writes to `output` a PMoL adapter with one expert group per entry of peft_dirs
    ({preference: PEFT LoRA folder}, same layers in each), every expert of a group
    starting as that LoRA, routers random (normal, std 0.02, seeded) and null experts
    added; config_kwargs go to MoLoRAConfig (e.g. group_loss_coef). Returns the config."""
    if not peft_dirs:
        raise ValueError("peft_dirs is empty: give {preference: PEFT LoRA folder}")
    loras = {g: read_peft_lora(d) for g, d in peft_dirs.items()}
    first_group, first = next(iter(loras.items()))
    layers = sorted(first.A)
    for g, lora in loras.items():
        if sorted(lora.A) != layers:
            raise ValueError(f"the PEFT LoRAs of {first_group!r} and {g!r} adapt different layers")
        if lora.saved:
            raise ValueError(f"the PEFT LoRA of {g!r} has modules_to_save; a PMoL adapter "
                             "cannot merge several")
    groups = list(loras)
    config_kwargs.setdefault("modules_to_save", [])
    r, s = max(lora.r for lora in loras.values()), first.scaling
    E = len(groups) * experts_per_group
    config = MoLoRAConfig(r=r, lora_alpha=s * r, num_experts=E, num_null_experts=num_null_experts,
                          top_k=min(top_k, E + num_null_experts), target_modules=layers,
                          expert_groups={g: list(range(i * experts_per_group, (i + 1) * experts_per_group))
                                         for i, g in enumerate(groups)}, **config_kwargs)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in layers:
        (R0, D), O = first.A[name].shape, first.B[name].shape[0]
        A, B = torch.zeros(E, r, D), torch.zeros(E, O, r)
        for i, g in enumerate(groups):
            lora = loras[g]
            for e in range(i * experts_per_group, (i + 1) * experts_per_group):
                A[e, :lora.r] = lora.A[name].float()
                B[e, :, :lora.r] = lora.B[name].float() * (lora.scaling / s)
        dtype = first.A[name].dtype
        tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = A.to(dtype), B.to(dtype)
        tensors[f"{name}.router.weight"] = (torch.randn(E + num_null_experts, D, generator=gen)
                                            * 0.02).to(dtype)
    write_adapter_files(output, _molora_meta(config, layers, first.config), tensors)
    return config
