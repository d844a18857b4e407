"""Hugging Face interop: models and tokenizers by hub id or folder (models.py), PEFT LoRA
adapters in and out (peft.py), the preference-label collator (collator.py). The trainer
subclasses need transformers (and TRL) at import and live in their own modules:
moe_ext.hf.trainer (MoLoRATrainer) and moe_ext.hf.trl_trainers (MoLoRADPOTrainer,
MoLoRARewardTrainer)."""
from .collator import PreferenceCollator
from .models import load_adapter_tokenizer, load_molora_model, load_pretrained, load_tokenizer
from .peft import molora_to_peft, peft_to_molora, pmol_adapter_from_peft

__all__ = ["load_pretrained", "load_tokenizer", "load_molora_model", "load_adapter_tokenizer",
           "PreferenceCollator", "peft_to_molora", "molora_to_peft", "pmol_adapter_from_peft"]
