"""moe_ext.functional: the public home of `molora` and friends (implemented in
moe_ext/molora/functional.py)."""
from .molora.functional import (STRATEGIES, MoLoRAOutput, choose_strategy, molora,
                                molora_with_routing)

__all__ = ["molora", "molora_with_routing", "choose_strategy", "MoLoRAOutput", "STRATEGIES"]
