"""TRL's DPOTrainer and RewardTrainer for MoLoRA models (needs `trl`).

- MoLoRADPOTrainer: the reference policy is the same model with its adapters off
  (AdaptersOffReference: no second copy in memory; TRL would otherwise load another
  copy of the base for a non-PEFT model); the router losses come in through TRL's own
  MoE path (`output_router_logits`, `aux_loss` x router_aux_loss_coef); a `preference`
  column feeds PMoL's group loss.
- MoLoRARewardTrainer: RewardTrainer plus the router losses (RewardTrainer does not add
  `aux_loss`) and the `preference` column; the reward head of a sequence-classification
  model is trained and saved with the adapter (modules_to_save).

Both save adapter-only checkpoints that resume (MoLoRATrainerMixin).
"""
from __future__ import annotations

import torch
from torch import nn
from trl import DPOTrainer, RewardTrainer

from ..molora import disable_adapters
from ..molora.outputs import router_flag_hidden
from .trainer import MoLoRATrainerMixin, quantized_base_accepted


class AdaptersOffReference(nn.Module):
    """The reference model of DPO as a view of the policy with its adapters off: calls run
    the policy's own modules under disable_adapters and no_grad. The policy is not a
    submodule (its parameters are not counted twice, .eval() / .to() leave it alone)."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        object.__setattr__(self, "policy", policy)

    @property
    def config(self):
        return self.policy.config

    @property
    def base_model(self):
        return self.policy.base_model

    def get_output_embeddings(self):
        return self.policy.get_output_embeddings()

    def forward(self, *args, **kwargs):
        return self.policy(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        kwargs.pop("preference", None)
        kwargs.pop("output_router_logits", None)
        with torch.no_grad(), disable_adapters(self.policy), router_flag_hidden(self.policy):
            return super().__call__(*args, **kwargs)


class MoLoRADPOTrainer(MoLoRATrainerMixin, DPOTrainer):
    """DPOTrainer(model, ...) for a MoLoRA model (pass the model object, not a name); other
    arguments as DPOTrainer's. Without ref_model the reference is the model with adapters
    off."""

    def __init__(self, model: nn.Module, ref_model=None, *args, **kwargs):
        if not isinstance(model, nn.Module) or not hasattr(model, "molora_config"):
            raise ValueError("MoLoRADPOTrainer needs a model with MoLoRA layers "
                             "(moe_ext.get_molora_model or load_molora)")
        with quantized_base_accepted(model):
            super().__init__(model, AdaptersOffReference(model) if ref_model is None else ref_model,
                             *args, **kwargs)
        self._wrap_preference_collator()


class MoLoRARewardTrainer(MoLoRATrainerMixin, RewardTrainer):
    """RewardTrainer for a MoLoRA sequence-classification model: the Bradley-Terry loss
    plus config.router_aux_loss_coef x the model's `aux_loss` (logged as aux_loss)."""

    def __init__(self, model=None, *args, **kwargs):
        with quantized_base_accepted(model):
            super().__init__(model, *args, **kwargs)
        self._wrap_preference_collator()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {**inputs, "output_router_logits": True}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        aux = outputs.get("aux_loss") if hasattr(outputs, "get") else None
        if aux is not None:
            coef = float(getattr(self.model.config, "router_aux_loss_coef", 1.0))
            loss = loss + coef * aux
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["aux_loss"].append(float(aux.detach()))
        return (loss, outputs) if return_outputs else loss
