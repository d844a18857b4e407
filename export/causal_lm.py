"""export_causal_lm: a MoLoRA-injected transformers causal LM as one ONNX graph for generation
with a KV cache (prefill and decode alike), the steering bias and, for a steerable adapter,
the preference mix as graph inputs.

Graph inputs (B batch, S new tokens, P past tokens, G expert groups, H KV heads, Dh head size):
  input_ids (B, S) int64; attention_mask (B, P + S) int64 (1 = real token, 0 = padding);
  position_ids (B, S) int64; group_bias (B or 1, G) float32, optional (defaults to zeros,
  steering as moe_ext.set_group_bias: group g's bias added to its experts' router logits in
  every layer; only when the adapter has expert groups);
  preference_weights (B or 1, G) float32, optional (defaults to zeros; only when the adapter
  is steerable, MoLoRAConfig.steerable): the preference mix per row, groups in the order of
  group_bias, each row on the simplex or all zeros ("the prompt decides", as no mix). The
  graph takes the rows as given: callers validate and normalise (OrtCausalLM.generate(mix=));
  past_key_values.{i}.key / .value (B, H, P, Dh) per layer i (P may be 0 for the prefill).
Graph outputs: logits (B, S, V) or (B, 1, V) (logits="last"); present.{i}.key / .value
  (B, H, P + S, Dh).
The names follow Hugging Face Optimum's decoder exports; the metadata (moe_ext.*) records the
cache layout, the groups in input order (moe_ext.groups), whether the graph takes
preference_weights (moe_ext.steerable: "true" / "false") and the token ids that generation
needs.
"""
from __future__ import annotations

import json
from typing import Optional

import numpy as np
import torch
from torch import nn

from moe_ext import __version__
from moe_ext.molora import molora_layers
from moe_ext.molora.layer import mix_override, routing_override

from .program import cast_for_export, export_graph

KIND = "causal_lm_with_past"
GROUP_BIAS = "group_bias"
PREFERENCE_WEIGHTS = "preference_weights"


def past_names(num_layers: int, prefix: str = "past_key_values") -> list[str]:
    """past_key_values.0.key, past_key_values.0.value, past_key_values.1.key, ..."""
    return [f"{prefix}.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def cache_layout(model: nn.Module) -> dict:
    """num_layers, num_kv_heads and head_dim of a transformers decoder's KV cache."""
    config = model.config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    layout = {"num_layers": int(config.num_hidden_layers),
              "num_kv_heads": int(getattr(config, "num_key_value_heads", None) or heads),
              "head_dim": int(getattr(config, "head_dim", None) or config.hidden_size // heads)}
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if types != {"full_attention"}:
        raise ValueError(f"export_causal_lm supports full-attention KV caches only; "
                         f"{type(model).__name__} has layer types {sorted(types)}")
    return layout


def group_membership(model: nn.Module) -> tuple[list[str], torch.Tensor]:
    """Sorted group names and the (G, E + N) 0/1 matrix of their experts (set_group_bias's sum)."""
    config = model.molora_config
    groups = sorted(config.expert_groups)
    member = torch.zeros(len(groups), config.num_experts + config.num_null_experts)
    for g, name in enumerate(groups):
        for e in config.expert_groups[name]:
            member[g, int(e)] += 1.0
    return groups, member


def _per_row(rows: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, ...) from `rows` (1 or B, ...) for input_ids (B, S): row b takes row b % rows. The
    count of rows is a dynamic dim of its own, so the graph never reads the batch size from
    such an input, whose default value (1, G) would make it 1."""
    count = torch.scalar_tensor(rows.shape[0], dtype=torch.long, device=rows.device)
    return rows[torch.arange(input_ids.shape[0], device=rows.device) % count]


class _WithCache(nn.Module):
    """Flat tensors in and out, for the exporter: forward(input_ids, attention_mask,
    position_ids, steering, past) -> (logits, *present) with steering the tuple of the
    steering inputs the graph takes ((), (group_bias,) or (group_bias, preference_weights):
    no None argument, which would keep the exporter from naming the dynamic axes) and past
    a tuple of 2 * layers tensors (key, value per layer).
    member (G, E + N): each group's experts, None without groups; mix_order (G,): for each
    of the config's groups its column in preference_weights (sorted names), None when the
    model is not steerable."""

    def __init__(self, model: nn.Module, member: Optional[torch.Tensor],
                 mix_order: Optional[torch.Tensor], last_only: bool):
        super().__init__()
        self.model, self.last_only = model, last_only
        self.register_buffer("member", member, persistent=False)
        self.register_buffer("mix_order", mix_order, persistent=False)

    def forward(self, input_ids, attention_mask, position_ids, steering, past):
        from transformers import DynamicCache

        pairs = [(past[i], past[i + 1]) for i in range(0, len(past), 2)]
        cache = DynamicCache(ddp_cache_data=pairs, config=self.model.config)
        row_bias = mix = None
        if self.member is not None:
            row_bias = _per_row(steering[0] @ self.member, input_ids)
        if self.mix_order is not None:
            # mix_override wants the config's group order; a row of zeros is "no mix" there too
            mix = _per_row(steering[1], input_ids)[:, self.mix_order]
        with routing_override(row_bias=row_bias, record=False), mix_override(mix):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, past_key_values=cache, use_cache=True,
                             logits_to_keep=1 if self.last_only else 0)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def _metadata(model: nn.Module, layout: dict, groups: list[str], steerable: bool,
              dtype: torch.dtype, logits: str) -> dict[str, str]:
    config = model.config
    gen = getattr(model, "generation_config", None)

    def token(name):
        value = getattr(gen, name, None) if gen is not None else None
        value = getattr(config, name, None) if value is None else value
        return json.dumps(value)

    return {"moe_ext.kind": KIND, "moe_ext.version": __version__,
            "moe_ext.molora_config": json.dumps(model.molora_config.to_dict()),
            "moe_ext.groups": json.dumps(groups), "moe_ext.steerable": json.dumps(steerable),
            "moe_ext.vocab_size": str(config.vocab_size),
            "moe_ext.dtype": str(dtype).replace("torch.", ""), "moe_ext.logits": logits,
            "moe_ext.model_type": str(getattr(config, "model_type", "")),
            "moe_ext.cache": json.dumps(layout), "moe_ext.eos_token_id": token("eos_token_id"),
            "moe_ext.pad_token_id": token("pad_token_id"), "moe_ext.bos_token_id": token("bos_token_id")}


def _example(model: nn.Module, layout: dict, groups: list[str], steerable: bool,
             dtype: torch.dtype):
    """Tracing inputs: batch 2, 3 new tokens, 4 past tokens (sizes > 1, so none is fixed)."""
    B, S, P = 2, 3, 4
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (B, S), generator=g)
    mask = torch.ones(B, P + S, dtype=torch.long)
    positions = torch.arange(P, P + S).expand(B, S).contiguous()
    H, Dh = layout["num_kv_heads"], layout["head_dim"]
    past = tuple(torch.randn(B, H, P, Dh, generator=g).to(dtype)
                 for _ in range(2 * layout["num_layers"]))
    steering, steering_dims = (), ()
    if groups:
        steering, steering_dims = (torch.zeros(B, len(groups)),), ({0: "group_bias_batch"},)
    if steerable:  # a mix per row (not zeros: the exporter must not see "no mix" rows only)
        steering += (torch.full((B, len(groups)), 1.0 / len(groups)),)
        steering_dims += ({0: "preference_weights_batch"},)
    batch, seq = "batch", "sequence"
    dims = ({0: batch, 1: seq}, {0: batch, 1: "total_sequence"}, {0: batch, 1: seq},
            steering_dims, tuple({0: batch, 2: "past_sequence"} for _ in past))
    return (ids, mask, positions, steering, past), dims


def _add_zero_defaults(proto, names: list[str], num_groups: int) -> None:
    """Makes the inputs `names` optional: an initializer of zeros (1, G) under each input's
    name, which onnxruntime uses when the input is not fed (an overridable initializer)."""
    from onnx import numpy_helper

    for name in names:
        proto.graph.initializer.append(
            numpy_helper.from_array(np.zeros((1, num_groups), np.float32), name))


def export_causal_lm(model: nn.Module, path: str, dtype: Optional[str] = None,
                     logits: str = "last", opset: int = 18,
                     optional_group_bias: bool = True) -> str:
    """Exports a MoLoRA-injected transformers causal LM (Llama, Qwen2, Mistral, ... with a
    full-attention KV cache) to `path` for generation with a KV cache; returns the path.

    dtype: None (the model's), "float32" or "float16" (weights, KV cache and logits).
    logits: "last" (only the last position's logits, (B, 1, V): what generation needs) or
      "all" ((B, S, V), e.g. to score sequences).
    The model's own steering (set_group_bias) is not baked in: the graph takes it as the
    group_bias input instead, and a steerable model's preference mix as preference_weights.
    The inputs and outputs are described in the module docstring.
    optional_group_bias: group_bias and preference_weights default to zeros (overridable
      initializers). False makes them plain required inputs: onnxruntime-genai passes
      set_model_input values only to inputs without a default, so export_folder writes so.
    """
    if not molora_layers(model) or not hasattr(model, "molora_config"):
        raise ValueError(f"export_causal_lm needs a MoLoRA-injected transformers causal LM "
                         f"(moe_ext.get_molora_model or load_molora), got {type(model).__name__}")
    if logits not in ("last", "all"):
        raise ValueError(f"logits must be 'last' or 'all', got {logits!r}")
    layout = cache_layout(model)
    model = cast_for_export(model, [], dtype)[0]
    weight_dtype = next(model.parameters()).dtype
    groups, member = group_membership(model)
    steerable = bool(groups) and bool(model.molora_config.steerable)
    args, dims = _example(model, layout, groups, steerable, weight_dtype)
    steering = ([GROUP_BIAS] if groups else []) + ([PREFERENCE_WEIGHTS] if steerable else [])
    names = ["input_ids", "attention_mask", "position_ids"] + steering \
        + past_names(layout["num_layers"])
    outputs = ["logits"] + past_names(layout["num_layers"], "present")
    mix_order = (torch.tensor([groups.index(g) for g in model.molora_config.expert_groups])
                 if steerable else None)
    graph = _WithCache(model, member if groups else None, mix_order, logits == "last")
    edit = ((lambda proto: _add_zero_defaults(proto, steering, len(groups)))
            if steering and optional_group_bias else None)
    with torch.no_grad():
        return export_graph(graph, model, list(args), names, outputs, dims,
                            _metadata(model, layout, groups, steerable, weight_dtype, logits),
                            path, opset, edit)
