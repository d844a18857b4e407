"""moe_ext: fast Mixture-of-LoRA-experts (MoLoRA) layers for PyTorch."""
from . import functional, ops, reference
from .config import MoLoRAConfig
from .layers import MoLoRALinear

__version__ = "0.1.0"
__all__ = ["MoLoRAConfig", "MoLoRALinear", "functional", "ops", "reference", "__version__"]
