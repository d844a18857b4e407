"""MoLoRAConfig: PEFT's vocabulary (r, lora_alpha, lora_dropout, target_modules) plus the
mixture-of-experts knobs. Serialises to and from plain JSON-able dicts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from ..utils.config import DictConfig


@dataclass
class MoLoRAConfig(DictConfig):
    r: int = 8                      # R, LoRA rank of every expert
    lora_alpha: float = 16.0        # scaling s = lora_alpha / r
    lora_dropout: float = 0.0       # dropout on the experts' input (not on the router's)
    target_modules: Optional[Union[list[str], str]] = None  # module-name suffixes or "all-linear"
    num_experts: int = 4            # E LoRA experts
    num_null_experts: int = 0       # N null experts: output 0, let the router keep the base
    top_k: int = 2                  # K experts per token; top_k = E + N is dense soft routing
    router_temperature: float = 1.0
    normalize_weights: bool = True  # renormalise the K chosen probabilities
    expert_groups: dict[str, list[int]] = field(default_factory=dict)  # preference -> experts
    router_aux_loss_coef: float = 0.01   # load balance
    router_z_loss_coef: float = 0.0
    group_loss_coef: float = 0.0         # expert-group soft loss (PMoL)
    strategy: str = "auto"               # "auto", "sparse" or "dense" (moe_ext.functional)
    # modules trained and saved whole beside the experts (PEFT's modules_to_save, matched by
    # name suffix); None: the head of a sequence/token-classification model ("score",
    # "classifier"), nothing otherwise
    modules_to_save: Optional[list[str]] = None

    def __post_init__(self):
        def need(ok: bool, name: str, what: str):
            if not ok:
                raise ValueError(f"MoLoRAConfig.{name} {what}, got {getattr(self, name)!r}")

        need(isinstance(self.r, int) and self.r >= 1, "r", "must be an int >= 1")
        need(self.lora_alpha > 0, "lora_alpha", "must be > 0")
        need(0.0 <= self.lora_dropout < 1.0, "lora_dropout", "must be in [0, 1)")
        need(isinstance(self.num_experts, int) and self.num_experts >= 1, "num_experts",
             "must be an int >= 1")
        need(isinstance(self.num_null_experts, int) and self.num_null_experts >= 0,
             "num_null_experts", "must be an int >= 0")
        total = self.num_experts + self.num_null_experts
        need(isinstance(self.top_k, int) and 1 <= self.top_k <= total, "top_k",
             f"must be in [1, num_experts + num_null_experts = {total}]")
        need(self.router_temperature > 0, "router_temperature", "must be > 0")
        need(self.strategy in ("auto", "sparse", "dense"), "strategy",
             "must be 'auto', 'sparse' or 'dense'")
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "group_loss_coef"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        need(self.modules_to_save is None or (isinstance(self.modules_to_save, list) and all(
            isinstance(m, str) and m for m in self.modules_to_save)), "modules_to_save",
            "must be None or a list of module names")
        for group, ids in self.expert_groups.items():
            if not ids or any(not (0 <= int(i) < total) for i in ids):
                raise ValueError(f"MoLoRAConfig.expert_groups[{group!r}] must list expert ids "
                                 f"in [0, {total}), got {ids!r}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

