"""moe_ext: fast Mixture-of-LoRA-experts (MoLoRA) layers for PyTorch."""
from . import functional, hf, ops
from .molora import (MoLoRAConfig, MoLoRALinear, disable_adapters, get_molora_model,
                     last_routing, load_molora, molora_layers, save_molora, set_group_bias)
from .ops import reference
from .version import __version__

ops.fallback.register_cuda_fallbacks()  # only for ops built without a CUDA kernel

__all__ = ["MoLoRAConfig", "MoLoRALinear", "functional", "ops", "reference", "get_molora_model",
           "save_molora", "load_molora", "disable_adapters", "molora_layers", "last_routing",
           "set_group_bias", "__version__"]
