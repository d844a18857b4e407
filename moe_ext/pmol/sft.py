"""Supervised fine-tuning (SFT) of a causal LM on preference rows, the step before DPO in
the usual pipeline: next-token loss on the response tokens of both the chosen and the
rejected response, so the model learns to answer in every style the data hold and DPO
then decides between them. The mixing experiment uses it to turn the random-weight tiny
Llama into a base that speaks the synthetic world; it trains whatever parameters require
gradients (all of them for a plain model)."""
from __future__ import annotations

import torch
from torch import nn

from ..data import PreferenceExample
from ..training import TrainConfig, TrainResult, train
from .data import encode_examples, pad_id, random_batches
from .dpo import sequence_logps


def sft_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean negative log-likelihood per response token of a collated batch (input_ids,
    attention_mask, response_mask: (B, S))."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    tokens = batch["response_mask"][:, 1:].sum().clamp_min(1)
    return -sequence_logps(logits, batch["input_ids"], batch["response_mask"]).sum() / tokens


def train_sft(model: nn.Module, examples: list[PreferenceExample], tokenizer,
              train_config: TrainConfig, batch_size: int = 16, **encode_options) -> TrainResult:
    """SFT on both responses of `examples` (encode_options as in train_pmol); each
    micro-step draws batch_size examples (2 * batch_size sequences), seeded by
    (seed, step, micro, rank)."""
    if not examples:
        raise ValueError("examples is empty")
    encoded = encode_examples(examples, tokenizer, **encode_options)
    batch_fn = random_batches(encoded, pad_id(tokenizer), [], train_config.seed, batch_size,
                              next(model.parameters()).device)

    def loss_fn(wrapped, raw, batch):
        loss = sft_loss(wrapped, batch)
        return loss, {"loss": loss.item()}

    return train(model, batch_fn, loss_fn, train_config, describe="sft")
