"""Hugging Face models and tokenizers by hub id or local folder, and MoLoRA adapters on
them: the base an adapter records (its name or path and class) is loaded unless another
one is named."""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from ..molora import load_molora, read_adapter_meta
from ..utils.sources import model_source

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")


def load_tokenizer(name_or_path: str):
    """AutoTokenizer for a hub id or folder; a tokenizer without a pad token pads with its
    EOS token (padding is masked out)."""
    from transformers import AutoTokenizer

    name_or_path = model_source(name_or_path, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise OSError(f"cannot load a tokenizer from {name_or_path!r}: {_first_line(err)}") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def load_pretrained(name_or_path: str, model_class: Optional[str] = None,
                    dtype: str = "float32") -> nn.Module:
    """`model_class` (a transformers class name; default AutoModelForCausalLM)
    .from_pretrained(name_or_path, dtype=...), a folder given by its absolute path (which
    the model's config.name_or_path, and so a saved adapter, records); OSError naming the
    model when it cannot be loaded (FileNotFoundError for a folder that does not exist)."""
    import transformers

    check_dtype(dtype)
    name_or_path = model_source(name_or_path)
    cls = getattr(transformers, model_class or "AutoModelForCausalLM", None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ValueError(f"transformers has no model class {model_class!r}")
    try:
        return cls.from_pretrained(name_or_path, dtype=DTYPES[dtype])
    except (OSError, ValueError) as err:
        raise OSError(f"cannot load {cls.__name__} from {name_or_path!r}: {_first_line(err)}") from None


def adapter_base(adapter: str, base: Optional[str] = None) -> tuple[str, Optional[str]]:
    """(base model name or path, class name) for the adapter folder: `base` if given; for
    the adapter of a train-pmol output, that output's own base_model/ (a copied output
    must not load the original's); else what the adapter records."""
    meta = read_adapter_meta(adapter)
    name = base or own_base_model(adapter) or meta.get("base_model_name_or_path")
    if not name:
        raise ValueError(f"adapter in {adapter!r} records no base model; name one (--base)")
    return name, meta.get("base_model_class") or meta.get("base_model_auto_class")


def own_base_model(adapter: str) -> Optional[str]:
    """The base_model/ folder beside `adapter` when `adapter` is the adapter/ folder of a
    train-pmol output (which saves its built-in base there), else None."""
    parent = os.path.dirname(os.path.abspath(adapter))
    base = os.path.join(parent, "base_model")
    if os.path.basename(os.path.abspath(adapter)) == "adapter" and os.path.isdir(base):
        return base
    return None


def load_molora_model(adapter: str, base: Optional[str] = None, dtype: str = "float32") -> nn.Module:
    """The base model (`base`, or the one the adapter records, with its class) with the
    MoLoRA adapter in `adapter` loaded, in eval mode."""
    name, cls = adapter_base(adapter, base)
    return load_molora(load_pretrained(name, cls, dtype), adapter).eval()


def load_adapter_tokenizer(adapter: str, base: Optional[str] = None):
    """The tokenizer saved beside the adapter (Trainer checkpoints and train-pmol save one
    there), else the base model's."""
    if os.path.isfile(os.path.join(adapter, "tokenizer_config.json")):
        return load_tokenizer(adapter)
    return load_tokenizer(adapter_base(adapter, base)[0])
