"""HF Trainer for MoLoRA models. Plain `transformers.Trainer` already trains a MoLoRA model
with its router losses (the model output's loss includes them when labels are given) and
saves adapter-only checkpoints (save_pretrained); MoLoRATrainerMixin adds what Trainer
cannot know:

- resuming (`train(resume_from_checkpoint=...)`) and load_best_model_at_end read those
  adapter checkpoints (load_molora into the model's own layers);
- a `preference` column (group name or index per row, None unlabelled) is kept and
  collated (PreferenceCollator), so each row's label reaches PMoL's group loss;
- a quantised base (QLoRA) is accepted (`quantized_base_accepted`): Trainer refuses a
  quantised model unless it carries PEFT adapters, and does not know MoLoRA's.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

from transformers import Trainer

from ..molora import load_molora, molora_layers
from ..molora.saving import CONFIG_NAME
from .collator import PREFERENCE, PreferenceCollator

_UNSET = object()


@contextlib.contextmanager
def quantized_base_accepted(model) -> Iterator[None]:
    """Around a Trainer's __init__: transformers' validate_quantization_for_training raises
    "You cannot perform fine-tuning on purely quantized models" for a quantised model
    without PEFT adapters (it reads `_hf_peft_config_loaded`). A MoLoRA model's adapters
    train the same way, so inside the block that flag reads True; it is restored after,
    since elsewhere transformers takes it to mean PEFT's own adapters are loaded."""
    if not (getattr(model, "is_quantized", False) and molora_layers(model)):
        yield
        return
    before = model.__dict__.get("_hf_peft_config_loaded", _UNSET)
    model._hf_peft_config_loaded = True
    try:
        yield
    finally:
        if before is _UNSET:
            del model._hf_peft_config_loaded
        else:
            model._hf_peft_config_loaded = before


class MoLoRATrainerMixin:
    """Mix into a Trainer subclass before it (class T(MoLoRATrainerMixin, Trainer))."""

    _kept_columns: tuple[str, ...] = (PREFERENCE,)  # dataset columns the collator reads

    def _wrap_preference_collator(self, multi_labels: bool = False) -> None:
        config = getattr(self.model, "molora_config", None)
        if config is None:
            raise ValueError(f"{type(self).__name__} needs a model with MoLoRA layers "
                             "(moe_ext.get_molora_model or load_molora)")
        groups = list(config.expert_groups)
        self.data_collator = PreferenceCollator(self.data_collator, groups, multi_labels)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        missing = [c for c in self._kept_columns if c not in self._signature_columns]
        if missing:
            self._signature_columns = list(self._signature_columns) + missing

    def _is_adapter_checkpoint(self, folder) -> bool:
        return bool(folder) and bool(molora_layers(self.model)) and os.path.isfile(
            os.path.join(folder, CONFIG_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self._is_adapter_checkpoint(resume_from_checkpoint):
            load_molora(model if model is not None else self.model, resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        if self._is_adapter_checkpoint(self.state.best_model_checkpoint):
            load_molora(self.model, self.state.best_model_checkpoint)
            return
        super()._load_best_model()


class MoLoRATrainer(MoLoRATrainerMixin, Trainer):
    """transformers.Trainer for a MoLoRA model: adapter checkpoints resume, and a
    `preference` column feeds the group loss."""

    def __init__(self, model=None, *args, **kwargs):
        with quantized_base_accepted(model):
            super().__init__(model, *args, **kwargs)
        self._wrap_preference_collator()
