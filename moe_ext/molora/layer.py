"""MoLoRALinear: a frozen base linear layer plus E LoRA experts chosen per token by a router.

    y = base(x) + s * sum_{k<K} w_k * B_{e_k} A_{e_k} dropout(x)

The base is an nn.Linear (also a quantised one: bitsandbytes' Linear4bit / Linear8bitLt,
torchao's; see quantized.py) or a GPT-2 style Conv1D (weight stored as (D, O)).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterator, NamedTuple, Optional

import torch
from torch import nn

from .config import MoLoRAConfig
from .functional import (choose_strategy, molora_from_shrink, molora_with_routing,
                         shrink_router_weight)
from .quantized import compute_dtype
from .shared_x import add_base_in_place, project


class LastRouting(NamedTuple):
    probs: torch.Tensor    # (T, E + N), keeps its graph so router losses can train the router
    experts: torch.Tensor  # (T, K)
    counts: torch.Tensor   # (E + N,)
    logits: torch.Tensor   # (T, E + N) router logits before bias and temperature (z-loss)


class RoutingOverride(NamedTuple):
    row_bias: Optional[torch.Tensor]  # (B, E + N) router-logit bias per batch row, or None
    record: bool                      # whether layers keep `last_routing`


_OVERRIDE: contextvars.ContextVar[Optional[RoutingOverride]] = contextvars.ContextVar(
    "moe_ext_routing_override", default=None)


@contextlib.contextmanager
def routing_override(row_bias: Optional[torch.Tensor] = None, record: bool = True) -> Iterator[None]:
    """Inside the block every MoLoRALinear routes with `row_bias` (B, E + N) added to the router
    logits of batch row b's tokens (x of shape (B, S, D); B may be 1 to share one bias) in place
    of its `logit_bias` buffer, and keeps `last_routing` only when `record`. The ONNX export
    uses it: there the bias is a graph input and no module attribute may change while tracing."""
    token = _OVERRIDE.set(RoutingOverride(row_bias, record))
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


_MIX: contextvars.ContextVar[Optional[torch.Tensor]] = contextvars.ContextVar(
    "moe_ext_preference_mix", default=None)


@contextlib.contextmanager
def mix_override(mix: Optional[torch.Tensor]) -> Iterator[None]:
    """Inside the block every steerable MoLoRALinear (MoLoRAConfig.steerable) routes with the
    preference mix `mix` (B, G) or (1, G): rows on the G-simplex over the config's
    expert_groups in their order; a row of zeros or None: the prompt alone decides (for that
    row, for every row). No checks here: callers
    go through moe_ext.molora.preference_mix, which validates the mix."""
    token = _MIX.set(mix)
    try:
        yield
    finally:
        _MIX.reset(token)


# the mix's log-weights are floored here (a group at weight 0 gets log(G * 1e-3) ~ -5.5 for
# G = 4: off for top-k routing, still a finite, differentiable logit)
MIX_FLOOR = 1e-3


def _add_row_bias(logits: torch.Tensor, row_bias: torch.Tensor) -> torch.Tensor:
    """logits (B, ..., M) + row_bias (B, M) per batch row, in at least float32 (as the route op)."""
    if row_bias.dim() != 2 or row_bias.shape[-1] != logits.shape[-1] or logits.dim() < 2:
        raise ValueError(f"routing_override row_bias must have shape (B, {logits.shape[-1]}) for "
                         f"router logits of shape {tuple(logits.shape)}, got {tuple(row_bias.shape)}")
    acc = torch.promote_types(logits.dtype, torch.float32)
    bias = row_bias.to(acc).reshape(row_bias.shape[0], *([1] * (logits.dim() - 2)), logits.shape[-1])
    return logits.to(acc) + bias


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 Conv1D: y = x @ weight + bias with weight (D, O)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(D, O) of an nn.Linear or Conv1D; ValueError for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    raise ValueError(f"base must be an nn.Linear or a transformers Conv1D, got {type(module).__name__}")


def _has_hooks(module: nn.Module) -> bool:
    """Forward hooks on `module` or on every module (accelerate's device hooks, for example)."""
    return bool(module._forward_hooks or module._forward_pre_hooks
                or getattr(nn.modules.module, "_global_forward_hooks", None)
                or getattr(nn.modules.module, "_global_forward_pre_hooks", None))


def _base_adds_in_place(base: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> bool:
    """Whether base(x) + delta may run as one GEMM accumulating into delta: a plain
    nn.Linear or Conv1D (not a quantised or other subclass), no hooks, one dtype and device,
    no autocast (it does not cast in-place ops), and not traced (the ONNX graphs keep
    the plain add)."""
    W = base.weight
    return ((type(base) is nn.Linear or is_conv1d(base)) and not _has_hooks(base)
            and type(W) in (nn.Parameter, torch.Tensor) and W.dtype == x.dtype == delta.dtype
            and W.device == x.device and delta.is_contiguous() and delta._base is None
            and not torch.is_autocast_enabled(x.device.type) and not _traced())


def _add_base_in_place(base: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """delta (T, O) += x (T, D) W^T (+ bias), in place: the GEMM reads delta in its
    epilogue (beta = 1 in cuBLAS / MKL) instead of a separate pass that reads base(x) and
    delta and writes their sum, and the sum is rounded once. delta must not be a view
    (autograd would wrap the in-place op in CopySlices: two more passes in backward).
    x may be the router GEMM's x_base (shared_x): then one dx for both GEMMs."""
    W_t = base.weight.t() if isinstance(base, nn.Linear) else base.weight  # (D, O)
    return add_base_in_place(delta, x, W_t, base.bias)


def _traced() -> bool:
    """Inside torch.jit tracing, torch.export or an ONNX export: the exported graphs keep the
    plain ops (the ONNX translation table knows them)."""
    return (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
            or torch.compiler.is_exporting())


class MoLoRALinear(nn.Module):
    """Wraps `base` (nn.Linear, quantised or not, or Conv1D, D -> O); the base is called as
    it is and only its output is added to (a quantised base's weight is never read).
    Parameters: lora_A (E, R, D), lora_B
    (E, O, R) (zeros, so a fresh layer equals its base), router (nn.Linear D -> E + N, no
    bias). Buffer logit_bias (E + N,) is added to the router logits (steering; zeros by
    default). A steerable config adds mix_scale (1,) and mix_proj (G, E + N): under a
    preference mix lambda (B, G) (preference_mix) the router logits of batch row b become
    log-shares within their groups (within_groups: the mix, not the prompt, decides between
    groups) plus mix_scale * log(G * lambda_b,g) on group g's experts plus lambda_b @
    mix_proj (mix_bias). After each forward, `last_routing` holds that call's routing.
    `adapters_enabled = False` makes the layer exactly its base (see disable_adapters)."""

    def __init__(self, base: nn.Module, config: MoLoRAConfig):
        super().__init__()
        if not isinstance(config, MoLoRAConfig):
            raise ValueError(f"config must be a MoLoRAConfig, got {type(config).__name__}")
        D, O = linear_features(base)
        self.base, self.config = base, config
        self.in_features, self.out_features = D, O
        self.adapters_enabled = True
        E, R, M = config.num_experts, config.r, config.num_experts + config.num_null_experts
        # a quantised base's weight is packed (uint8 / int8): the experts take its compute dtype
        kw = dict(device=base.weight.device, dtype=compute_dtype(base))
        self.lora_A = nn.Parameter(torch.empty(E, R, D, **kw))
        self.lora_B = nn.Parameter(torch.zeros(E, O, R, **kw))
        self.router = nn.Linear(D, M, bias=False, **kw)
        self.register_buffer("logit_bias", torch.zeros(M, device=kw["device"]), persistent=False)
        self.mix_scale = self.mix_proj = None
        if config.steerable:
            groups = list(config.expert_groups.values())
            self.mix_scale = nn.Parameter(torch.ones(1, **kw))
            self.mix_proj = nn.Parameter(torch.zeros(len(groups), M, **kw))
            member = torch.zeros(len(groups), M, device=kw["device"])
            for g, ids in enumerate(groups):
                member[g, ids] = 1.0
            self.register_buffer("mix_members", member, persistent=False)  # (G, E + N)
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.last_routing: Optional[LastRouting] = None
        self.reset_lora_parameters()

    def __getstate__(self):
        # last_routing holds graph tensors that cannot be copied; copies start without it
        state = self.__dict__.copy()
        state["last_routing"] = None
        return state

    def reset_lora_parameters(self):
        """A like PEFT's LoRA (Kaiming-uniform per expert), B zero, router small and random."""
        with torch.no_grad():
            for e in range(self.lora_A.shape[0]):
                nn.init.kaiming_uniform_(self.lora_A[e], a=math.sqrt(5))
            self.lora_B.zero_()
            nn.init.normal_(self.router.weight, std=0.02)
            if self.mix_proj is not None:  # at first the mix is a plain group bias log(G lambda_g)
                self.mix_scale.fill_(1.0)
                self.mix_proj.zero_()

    def mix_bias(self, mix: torch.Tensor) -> torch.Tensor:
        """Router-logit bias (B, E + N) of a preference mix (B, G) (rows on the simplex, or all
        zero: no bias for that row):
        mix_scale * log(G * max(lambda_g, MIX_FLOOR)) on each expert of group g (0 at the
        uniform mix; null and shared experts get none) plus lambda @ mix_proj, a learned
        bias per expert (the null expert's share can follow the mix), in float32."""
        G = self.mix_members.shape[0]
        lam = mix.to(device=self.mix_members.device, dtype=torch.float32)
        logw = torch.log(G * lam.clamp_min(MIX_FLOOR))
        bias = self.mix_scale.float() * (logw @ self.mix_members.float()) + lam @ self.mix_proj.float()
        # a row of zeros: no mix for that row (training mixes such rows into its batches)
        return bias * (lam.sum(-1, keepdim=True) > 0).to(bias.dtype)

    def within_groups(self, logits: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
        """Router logits (B, ..., E + N) of the batch rows that have a mix (B or 1, G) (a row
        not all zero) as log-shares within each group, in float32: a grouped expert's logit
        minus the logsumexp of its group's, an expert in no group (the null expert) its logit
        minus the logsumexp of all grouped experts'. With mix_bias added, the mix alone
        decides how much each group gets and the router only how a group's share is split
        between its experts (token routing inside a group) and how much goes to the null
        expert. Why: the group loss trains the router to read the preference from the prompt;
        left in, that reading would fight the mix (a prompt that asks for brevity pulling a
        verbose mix back), and the mix's DPO gradient would flatten it. Rows without a mix
        keep the router's logits."""
        member = self.mix_members.to(torch.bool)                      # (G, E + N)
        L = logits.float()
        grouped = member.any(0)                                       # (E + N,)
        group_lse = torch.logsumexp(L.unsqueeze(-2).masked_fill(~member, float("-inf")), -1)
        all_lse = torch.logsumexp(L.masked_fill(~grouped, float("-inf")), -1, keepdim=True)
        own = group_lse @ self.mix_members.float() + all_lse * (~grouped).float()  # (B, ..., E + N)
        has = (mix.sum(-1) > 0).to(L.device).reshape(-1, *([1] * (L.dim() - 1)))
        return torch.where(has, L - own, L)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D) -> (..., O)."""
        if not self.adapters_enabled:
            return self.base(x)
        out, x_base = self._run(x, flat=True)
        delta = out.delta  # (T, O)
        if _base_adds_in_place(self.base, x, delta):
            x2 = x_base if x_base is not None else x.reshape(-1, x.shape[-1])
            return _add_base_in_place(self.base, x2, delta).view(*x.shape[:-1], delta.shape[-1])
        y = self.base(x)
        return y + delta.reshape(y.shape).to(y.dtype)

    def molora_output(self, x: torch.Tensor):
        """The experts' delta (..., O) and this call's routing; records `last_routing`."""
        return self._run(x, flat=False)[0]

    def _run(self, x: torch.Tensor, flat: bool):
        """(molora_output, x_base); with `flat` the delta is (T, O), the kernel's own tensor.
        x_base: x as (T, D) for the base GEMM, sharing the router GEMM's dx (shared_x), or
        None when the router runs as a module."""
        c = self.config
        A, B, M = self.lora_A, self.lora_B, c.num_experts + c.num_null_experts
        if torch.is_autocast_enabled(x.device.type):  # run the experts in the autocast dtype
            dtype = torch.get_autocast_dtype(x.device.type)
            x, A, B = x.to(dtype), A.to(dtype), B.to(dtype)
        elif x.dtype != A.dtype:
            x = x.to(A.dtype)
        strategy = c.strategy
        if strategy == "auto":
            strategy = choose_strategy(c.num_experts, c.top_k, c.r, x.device)
        x_base = h_all = None
        plain = self._router_is_plain(x)
        fuse = plain and strategy == "dense" and self._dropout_inactive()
        autocast = torch.is_autocast_enabled(x.device.type)
        if fuse or (plain and not autocast):
            # the router's GEMM (dense: with every expert's shrink) as one projection of x
            weight = shrink_router_weight(A, self.router.weight) if fuse else self.router.weight
            x2 = x.reshape(-1, x.shape[-1])
            logits, x_base = (x2 @ weight.T, None) if autocast else project(x2, weight)
            if fuse:  # [h_all | logits]
                h_all, logits = logits.split([weight.shape[0] - M, M], dim=-1)
            logits = logits.reshape(*x.shape[:-1], M)
        else:
            logits = self.router(x)
        override = _OVERRIDE.get()
        route_logits, bias = logits, self.logit_bias
        if override is not None and override.row_bias is not None:
            route_logits, bias = _add_row_bias(logits, override.row_bias), None
        mix = _MIX.get()
        if mix is not None and self.mix_proj is not None:
            route_logits = _add_row_bias(self.within_groups(route_logits, mix), self.mix_bias(mix))
        route_kw = dict(temperature=c.router_temperature, logit_bias=bias)
        if h_all is not None:  # the routing keeps x's batch rows (row_bias above)
            out = molora_from_shrink(h_all, route_logits.reshape(-1, logits.shape[-1]), B, c.top_k,
                                     c.scaling, c.num_null_experts, c.normalize_weights, **route_kw)
            if not flat:
                out = out._replace(delta=out.delta.reshape(*x.shape[:-1], B.shape[1]))
        else:
            xd = self.dropout(x)
            if flat:  # the routing keeps x's batch rows (row_bias above); the kernels see (T, D)
                xd = xd.reshape(-1, xd.shape[-1])
                route_logits = route_logits.reshape(-1, logits.shape[-1])
            out = molora_with_routing(xd, route_logits, A, B, c.top_k, c.scaling,
                                      c.num_null_experts, c.normalize_weights, strategy=strategy,
                                      **route_kw)
        if override is None or override.record:
            self.last_routing = LastRouting(out.probs, out.experts, out.counts,
                                            logits.reshape(-1, logits.shape[-1]))
        return out, x_base

    def _router_is_plain(self, x: torch.Tensor) -> bool:
        """Whether the router's logits may come from a GEMM of our own: a plain bias-free
        nn.Linear without hooks, of the experts' dtype (or autocast), not traced."""
        r = self.router
        return (type(r) is nn.Linear and r.bias is None and not _has_hooks(r)
                and (r.weight.dtype == self.lora_A.dtype or torch.is_autocast_enabled(x.device.type))
                and not _traced())

    def _router_fuses(self, x: torch.Tensor) -> bool:
        """Whether the dense strategy may take the router logits from its shrink GEMM (x read
        once): a plain router and no active dropout (the router sees x, the experts
        dropout(x))."""
        return self._router_is_plain(x) and self._dropout_inactive()

    def _dropout_inactive(self) -> bool:
        return isinstance(self.dropout, nn.Identity) or not self.dropout.training

    def extra_repr(self) -> str:
        c = self.config
        return (f"in={self.in_features}, out={self.out_features}, E={c.num_experts}, "
                f"N={c.num_null_experts}, K={c.top_k}, r={c.r}, scaling={c.scaling:g}")


def molora_layers(model: nn.Module) -> dict[str, MoLoRALinear]:
    """Every MoLoRALinear of the model by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MoLoRALinear)}
