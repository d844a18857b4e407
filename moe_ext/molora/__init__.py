"""MoLoRA layers and models: the config, the functional delta on the fastest kernel, the
layer, injection into any model, adapter files, router losses and the PyTorch baselines
that benchmarks compare against."""
from . import functional, losses
from .config import MoLoRAConfig
from .layer import LastRouting, MoLoRALinear
from .model import (base_state_dict, disable_adapters, find_target_modules, get_molora_model, last_routing,
                    molora_layers, set_group_bias)
from .saving import adapter_state_dict, load_molora, read_molora_config, save_molora

__all__ = ["MoLoRAConfig", "MoLoRALinear", "LastRouting", "functional", "losses",
           "get_molora_model", "find_target_modules", "molora_layers", "disable_adapters",
           "last_routing", "set_group_bias", "save_molora", "load_molora", "read_molora_config",
           "adapter_state_dict", "base_state_dict"]
