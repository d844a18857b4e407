"""MoLoRAConfig: PEFT's vocabulary (r, lora_alpha, lora_dropout, target_modules) plus the
mixture-of-experts knobs. Serialises to and from plain JSON-able dicts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from ..utils.config import DictConfig, is_int, is_real
from .targets import UnsafeRegex, check_target_regex


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
    # steerable routing: every router also takes the preference mix lambda over the
    # expert_groups (layer.py, preference_mix); False: the prompt alone decides
    steerable: bool = False
    # modules trained and saved whole beside the experts (PEFT's modules_to_save, matched by
    # name suffix); None: the head of a sequence/token-classification model ("score",
    # "classifier"), nothing otherwise
    modules_to_save: Optional[list[str]] = None

    def __post_init__(self):
        def need(ok: bool, name: str, what: str):
            if not ok:
                raise ValueError(f"MoLoRAConfig.{name} {what}, got {getattr(self, name)!r}")

        need(is_int(self.r) and self.r >= 1, "r", "must be an int in [1, 2**31 - 1]")
        need(is_real(self.lora_alpha) and self.lora_alpha > 0, "lora_alpha",
             "must be a finite number > 0")
        need(is_real(self.lora_dropout) and 0.0 <= self.lora_dropout < 1.0, "lora_dropout",
             "must be a number in [0, 1)")
        need(is_int(self.num_experts) and self.num_experts >= 1, "num_experts",
             "must be an int in [1, 2**31 - 1]")
        need(is_int(self.num_null_experts) and self.num_null_experts >= 0,
             "num_null_experts", "must be an int in [0, 2**31 - 1]")
        total = self.num_experts + self.num_null_experts
        need(is_int(self.top_k) and 1 <= self.top_k <= total, "top_k",
             f"must be an int in [1, num_experts + num_null_experts = {total}]")
        need(is_real(self.router_temperature) and self.router_temperature > 0,
             "router_temperature", "must be a finite number > 0")
        need(isinstance(self.normalize_weights, bool), "normalize_weights", "must be true or false")
        need(isinstance(self.steerable, bool), "steerable", "must be true or false")
        need(not self.steerable or bool(self.expert_groups), "steerable",
             "needs expert_groups (the mix is over the groups)")
        need(self.strategy in ("auto", "sparse", "dense"), "strategy",
             "must be 'auto', 'sparse' or 'dense'")
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "group_loss_coef"):
            need(is_real(getattr(self, name)) and getattr(self, name) >= 0, name,
                 "must be a finite number >= 0")
        need(self.modules_to_save is None or (isinstance(self.modules_to_save, list) and all(
            isinstance(m, str) and m for m in self.modules_to_save)), "modules_to_save",
            "must be None or a list of module names")
        need(self.target_modules is None or _valid_targets(self.target_modules),
             "target_modules", "must be None, 'all-linear', a valid regex or a list of names")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            try:  # before any matching: a downloaded config's regex may backtrack for hours
                check_target_regex(self.target_modules)
            except UnsafeRegex as err:
                raise ValueError(f"MoLoRAConfig.{err}") from None
        need(isinstance(self.expert_groups, dict), "expert_groups",
             "must map preference names to lists of expert ids")
        for group, ids in self.expert_groups.items():
            if not (isinstance(ids, list) and ids and all(is_int(i) and 0 <= i < total for i in ids)
                    and len(set(ids)) == len(ids)):
                raise ValueError(f"MoLoRAConfig.expert_groups[{group!r}] must list distinct int "
                                 f"expert ids in [0, {total}), got {ids!r}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r



def _valid_targets(value) -> bool:
    """A list of names, or a string (a regex, checked by check_target_regex)."""
    if isinstance(value, list):
        return all(isinstance(v, str) and v for v in value)
    return isinstance(value, str) and bool(value)
