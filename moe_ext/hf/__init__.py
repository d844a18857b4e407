"""Hugging Face interop: models and tokenizers by hub id or folder (models.py), PEFT LoRA
adapters in and out (peft.py), the preference-label collator (collator.py). The trainer
subclasses need transformers and TRL and are imported from their own modules:
moe_ext.hf.trainer (MoLoRATrainer) and moe_ext.hf.trl_trainers (MoLoRADPOTrainer,
MoLoRARewardTrainer)."""
from .models import load_adapter_tokenizer, load_molora_model, load_pretrained, load_tokenizer

__all__ = ["load_pretrained", "load_tokenizer", "load_molora_model", "load_adapter_tokenizer"]
