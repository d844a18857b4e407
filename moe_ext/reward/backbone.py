"""Backbone mode of the sparse MoE reward model: an HF transformers encoder or decoder
(optionally with MoLoRA layers inside) turns token ids into the prompt and response
embeddings, trained end to end with the MoE head on the shared training loop.

Shapes: prompt ids / mask (B, Sp), prompt + response ids / mask (B, S), rewards (B,).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..training import train
from .fit import FitConfig, moe_loss
from .model import SparseMoERewardModel


class BackboneRewardModel(nn.Module):
    """Backbone mode: an HF transformers encoder or decoder (optionally with MoLoRA layers
    inside, see moe_ext.get_molora_model) turns token ids into embeddings, trained end to
    end with the sparse MoE head. The prompt embedding is the pooled prompt; the response
    embedding is the pooled prompt + response sequence."""

    def __init__(self, backbone: nn.Module, num_experts: int, top_k: int = 1,
                 expert_hidden: Optional[int] = None, pooling: str = "mean"):
        super().__init__()
        if pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
        hidden = backbone.config.hidden_size
        self.backbone, self.pooling = backbone, pooling
        self.head = SparseMoERewardModel(hidden, hidden, num_experts, top_k, expert_hidden)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, S) ids and mask -> (B, hidden) pooled last hidden state."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                            output_hidden_states=True)
        hidden = out.hidden_states[-1]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "mean":
            return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        last = attention_mask.sum(1).clamp_min(1) - 1
        return hidden[torch.arange(hidden.shape[0]), last]

    def forward(self, prompt_ids, prompt_mask, sequence_ids, sequence_mask,
                user_weights: Optional[torch.Tensor] = None, rejected_ids=None,
                rejected_mask=None, fit_config: Optional[FitConfig] = None):
        """Rewards (B,) for prompts (B, Sp) and prompt + response sequences (B, S).
        Given rejected_ids/rejected_mask too (sequence_* being the chosen ones), returns the
        training loss and metrics of `moe_loss` instead, so that DDP sees one forward."""
        prompt = self.encode(prompt_ids, prompt_mask)
        seq = self.encode(sequence_ids, sequence_mask)
        if rejected_ids is None:
            return self.head(prompt, seq, user_weights)
        rejected = self.encode(rejected_ids, rejected_mask)
        return moe_loss(self.head, prompt, seq, rejected, fit_config or FitConfig())


def train_backbone_reward_model(model: BackboneRewardModel, batch_fn, train_config,
                                fit_config: Optional[FitConfig] = None):
    """End-to-end training with the shared loop (moe_ext.training: progress, atomic
    checkpoints, resume, DDP). batch_fn(step, micro, rank, world) returns a dict with
    prompt_ids, prompt_mask, chosen_ids, chosen_mask, rejected_ids, rejected_mask."""
    cfg = fit_config or FitConfig()

    def loss_fn(wrapped, raw, b):
        return wrapped(b["prompt_ids"], b["prompt_mask"], b["chosen_ids"], b["chosen_mask"],
                       rejected_ids=b["rejected_ids"], rejected_mask=b["rejected_mask"],
                       fit_config=cfg)

    return train(model, batch_fn, loss_fn, train_config, describe="reward model")
