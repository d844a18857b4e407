"""ONNX export of reward models, both modes, routed or personalised.

Embedding mode (SparseMoERewardModel) and backbone mode (BackboneRewardModel: tokens in,
the whole transformers backbone, MoLoRA layers included, in the graph). Give a
`user_weights` tensor (B, E) in the example inputs and the graph takes a user's expert
weights (from moe_ext.reward.adapt) in place of the router's; the prompt is then not an
input, since the router is the only thing that reads it.

  mode       routed inputs                              personalised inputs
  embedding  prompt_emb (B, P), response_emb (B, Dr)    response_emb, user_weights (B, E)
  backbone   prompt_input_ids, prompt_attention_mask    input_ids, attention_mask,
             (B, Sp), input_ids, attention_mask (B, S)  user_weights (B, E)

Outputs: rewards (B,), expert_rewards (B, E) (so a client can mix any user's weights
itself) and, routed, routing_weights (B, E) (the sparse top-K gates).
"""
from __future__ import annotations

import json
from typing import Optional

import torch
from torch import nn

from moe_ext import __version__
from moe_ext.reward import BackboneRewardModel, SparseMoERewardModel

from .program import cast_for_export, export_graph

REWARD_KINDS = ("reward_model", "backbone_reward_model")
_INPUTS = {  # (kind, personalised) -> input names in order
    ("reward_model", False): ("prompt_emb", "response_emb"),
    ("reward_model", True): ("response_emb", "user_weights"),
    ("backbone_reward_model", False): ("prompt_input_ids", "prompt_attention_mask", "input_ids",
                                       "attention_mask"),
    ("backbone_reward_model", True): ("input_ids", "attention_mask", "user_weights"),
}
_DYNAMIC = {"prompt_emb": {0: "batch"}, "response_emb": {0: "batch"}, "user_weights": {0: "batch"},
            "prompt_input_ids": {0: "batch", 1: "prompt_sequence"},
            "prompt_attention_mask": {0: "batch", 1: "prompt_sequence"},
            "input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}


def reward_kind(model: nn.Module) -> Optional[str]:
    if isinstance(model, SparseMoERewardModel):
        return "reward_model"
    if isinstance(model, BackboneRewardModel):
        return "backbone_reward_model"
    return None


class _RewardGraph(nn.Module):
    """Positional tensors in the order of _INPUTS -> (rewards, expert_rewards[, routing_weights])."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, a, b, c=None, d=None):
        x = dict(zip(self.names, (a, b, c, d)))
        model = self.model
        if isinstance(model, BackboneRewardModel):
            head = model.head
            response = model.encode(x["input_ids"], x["attention_mask"])
            if "prompt_input_ids" in x:
                x["prompt_emb"] = model.encode(x["prompt_input_ids"], x["prompt_attention_mask"])
        else:
            head, response = model, x["response_emb"]
        experts = head.expert_rewards(response)
        if "user_weights" in x:
            return (experts * x["user_weights"].to(experts.dtype)).sum(-1), experts
        gates, _ = head.gates(x["prompt_emb"])
        gates = gates.to(experts.dtype)
        return (experts * gates).sum(-1), experts, gates


def _metadata(model: nn.Module, kind: str, personalised: bool) -> dict[str, str]:
    head = model.head if kind == "backbone_reward_model" else model
    meta = {"moe_ext.kind": kind, "moe_ext.version": __version__,
            "moe_ext.reward_config": json.dumps(head.config.to_dict()),
            "moe_ext.personalized": json.dumps(personalised)}
    if kind == "backbone_reward_model":
        meta["moe_ext.backbone_config"] = json.dumps(model.config.to_dict())
        meta["moe_ext.vocab_size"] = str(getattr(model.backbone.config, "vocab_size", 2))
        molora = getattr(model.backbone, "molora_config", None)
        if molora is not None:
            meta["moe_ext.molora_config"] = json.dumps(molora.to_dict())
    return meta


def reward_to_onnx(model: nn.Module, path: str, example_inputs: dict, dynamic: bool = True,
                   dtype: Optional[str] = None, opset: int = 18) -> str:
    """to_onnx for reward models (see the module docstring); returns the path."""
    kind = reward_kind(model)
    if kind is None:
        raise ValueError(f"reward_to_onnx exports a SparseMoERewardModel or a "
                         f"BackboneRewardModel, got {type(model).__name__}")
    if not isinstance(example_inputs, dict):
        raise ValueError("example_inputs must be a dict of input name -> tensor")
    personalised = "user_weights" in example_inputs
    names = _INPUTS[(kind, personalised)]
    unknown = sorted(set(example_inputs) - set(names))
    missing = [n for n in names if n not in example_inputs]
    if unknown or missing:
        note = " (with user_weights the router, and so the prompt, is not in the graph)" \
            if personalised else ""
        raise ValueError(f"example_inputs for a {kind}: expected {list(names)}; unknown "
                         f"{unknown}, missing {missing}{note}")
    E = model.num_experts
    if personalised and (example_inputs["user_weights"].dim() != 2
                         or example_inputs["user_weights"].shape[1] != E):
        raise ValueError(f"user_weights must have shape (B, {E}), got "
                         f"{tuple(example_inputs['user_weights'].shape)}")
    model, tensors = cast_for_export(model, [example_inputs[n] for n in names], dtype)
    outputs = ["rewards", "expert_rewards"] + ([] if personalised else ["routing_weights"])
    return export_graph(_RewardGraph(model, names), model, tensors, names, outputs,
                        tuple(_DYNAMIC[n] for n in names) if dynamic else None,
                        _metadata(model, kind, personalised), path, opset)


def reward_example_inputs(model: nn.Module, personalised: bool = False, batch: int = 2) -> dict:
    """Example inputs to trace `model` with (random embeddings, or a few tokenized texts for
    a backbone model; uniform user weights when personalised)."""
    kind = reward_kind(model)
    if kind is None:
        raise ValueError(f"not a reward model: {type(model).__name__}")
    g = torch.Generator().manual_seed(0)
    x = {}
    if kind == "reward_model":
        if not personalised:
            x["prompt_emb"] = torch.randn(batch, model.prompt_dim, generator=g)
        x["response_emb"] = torch.randn(batch, model.response_dim, generator=g)
    else:
        prompts = [f"an example prompt number {i}" for i in range(batch)]
        seq = model.tokenize(prompts, ["a short example answer"] * batch)
        x["input_ids"], x["attention_mask"] = seq["input_ids"], seq["attention_mask"]
        if not personalised:
            p = model.tokenize(prompts)
            x["prompt_input_ids"], x["prompt_attention_mask"] = p["input_ids"], p["attention_mask"]
    if personalised:
        x["user_weights"] = torch.full((batch, model.num_experts), 1.0 / model.num_experts)
    return x
