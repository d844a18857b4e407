"""moe_ext.functional: the public home of `molora` and friends (implemented in
moe_ext/molora/functional.py)."""
from .molora.functional import (STRATEGIES, MoLoRAOutput, choose_strategy,
                                dense_shrink_with_router, molora, molora_from_shrink,
                                molora_with_routing, shrink_router_weight)

__all__ = ["molora", "molora_with_routing", "choose_strategy", "MoLoRAOutput", "STRATEGIES",
           "dense_shrink_with_router", "molora_from_shrink", "shrink_router_weight"]
