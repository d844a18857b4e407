"""MoLoRA layers and models: the config, the functional delta on the fastest kernel, the
layer (over float or quantised bases), injection into any model, router losses (also as
the model output's `aux_loss`), adapter files and the PyTorch baselines that benchmarks
compare against."""
from . import functional, losses, quantized
from .config import MoLoRAConfig
from .layer import LastRouting, MoLoRALinear, molora_layers
from .model import (base_state_dict, default_modules_to_save, disable_adapters, find_target_modules,
                    inject_molora, is_steerable, last_routing, mix_tensor, preference_mix,
                    set_group_bias)
from .quantized import compute_dtype, quantization_of, require_float_base
from .saving import (adapter_parameters, adapter_state_dict, get_molora_model, load_molora, read_adapter_files, read_adapter_meta,
                     read_molora_config, save_molora, write_adapter_files)

__all__ = ["MoLoRAConfig", "MoLoRALinear", "LastRouting", "functional", "losses", "quantized",
           "compute_dtype", "quantization_of", "require_float_base",
           "get_molora_model", "inject_molora", "find_target_modules", "default_modules_to_save",
           "molora_layers", "disable_adapters", "last_routing", "set_group_bias",
           "preference_mix", "mix_tensor", "is_steerable", "save_molora",
           "load_molora", "read_molora_config", "read_adapter_meta", "adapter_state_dict",
           "adapter_parameters",
           "read_adapter_files", "write_adapter_files",
           "base_state_dict"]
