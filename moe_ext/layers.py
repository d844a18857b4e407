"""MoLoRALinear: a frozen base linear layer plus E LoRA experts chosen per token by a router.

    y = base(x) + s * sum_{k<K} w_k * B_{e_k} A_{e_k} dropout(x)
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import nn

from .config import MoLoRAConfig
from .functional import molora_with_routing


class LastRouting(NamedTuple):
    probs: torch.Tensor    # (T, E + N), keeps its graph so router losses can train the router
    experts: torch.Tensor  # (T, K)
    counts: torch.Tensor   # (E + N,)


class MoLoRALinear(nn.Module):
    """Wraps `base` (nn.Linear D -> O). Parameters: lora_A (E, R, D), lora_B (E, O, R)
    (zeros, so a fresh layer equals its base), router (nn.Linear D -> E + N, no bias).
    Buffer logit_bias (E + N,) is added to the router logits (steering; zeros by default).
    After each forward, `last_routing` holds that call's routing."""

    def __init__(self, base: nn.Linear, config: MoLoRAConfig):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"base must be an nn.Linear, got {type(base).__name__}")
        if not isinstance(config, MoLoRAConfig):
            raise ValueError(f"config must be a MoLoRAConfig, got {type(config).__name__}")
        self.base, self.config = base, config
        D, O = base.in_features, base.out_features
        E, R, M = config.num_experts, config.r, config.num_experts + config.num_null_experts
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(E, R, D, **kw))
        self.lora_B = nn.Parameter(torch.zeros(E, O, R, **kw))
        self.router = nn.Linear(D, M, bias=False, **kw)
        self.register_buffer("logit_bias", torch.zeros(M, device=kw["device"]), persistent=False)
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.last_routing: Optional[LastRouting] = None
        self.reset_lora_parameters()

    def reset_lora_parameters(self):
        """A like PEFT's LoRA (Kaiming-uniform per expert), B zero, router small and random."""
        with torch.no_grad():
            for e in range(self.lora_A.shape[0]):
                nn.init.kaiming_uniform_(self.lora_A[e], a=math.sqrt(5))
            self.lora_B.zero_()
            nn.init.normal_(self.router.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D) -> (..., O)."""
        out = self.molora_output(x)
        return self.base(x) + out.delta.to(self.base.weight.dtype)

    def molora_output(self, x: torch.Tensor):
        """The experts' delta (..., O) and this call's routing; records `last_routing`."""
        c = self.config
        out = molora_with_routing(
            self.dropout(x), self.router(x), self.lora_A, self.lora_B, c.top_k, c.scaling,
            c.num_null_experts, c.normalize_weights, temperature=c.router_temperature,
            logit_bias=self.logit_bias, strategy=c.strategy)
        self.last_routing = LastRouting(out.probs, out.experts, out.counts)
        return out

    def extra_repr(self) -> str:
        c = self.config
        return (f"in={self.base.in_features}, out={self.base.out_features}, E={c.num_experts}, "
                f"N={c.num_null_experts}, K={c.top_k}, r={c.r}, scaling={c.scaling:g}")
