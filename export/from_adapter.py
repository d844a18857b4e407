"""export_adapter: a saved MoLoRA adapter + its base model (hub id or folder) to a generation
graph, with the tokenizer written beside it (what `moe-ext export --adapter` runs).

The adapter may be an adapter folder (adapter_config.json + adapter_model.safetensors) or
a PMoL artefact folder (adapter/, base_model/, tokenizer.json, as written by
moe_ext.pmol.run_pmol_job). The base defaults to the one the adapter records
(`base_model_name_or_path` in adapter_config.json, PEFT's key), else to the artefact's
base_model/ folder.
"""
from __future__ import annotations

import os
from typing import Optional

from moe_ext.molora import load_molora
from moe_ext.molora.saving import CONFIG_NAME
from moe_ext.utils.io import read_json

from .causal_lm import export_causal_lm

TOKENIZER_FILE = "tokenizer.json"


def resolve_adapter(path: str) -> tuple[str, Optional[str]]:
    """(adapter folder, PMoL artefact folder or None) for an adapter or artefact folder."""
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        parent = os.path.dirname(os.path.abspath(path))
        artefact = parent if os.path.isdir(os.path.join(parent, "base_model")) else None
        return path, artefact
    if os.path.isfile(os.path.join(path, "adapter", CONFIG_NAME)):
        return os.path.join(path, "adapter"), path
    raise FileNotFoundError(f"--adapter {path!r}: no {CONFIG_NAME} there or in its adapter/ "
                            f"folder (a save_molora folder or a train-pmol output)")


def resolve_base(adapter: str, artefact: Optional[str], base: Optional[str]) -> str:
    """The base model: `base` if given, else what the adapter records, else artefact/base_model."""
    if base:
        return base
    recorded = read_json(os.path.join(adapter, CONFIG_NAME)).get("base_model_name_or_path")
    if recorded:
        return recorded
    if artefact is not None:
        return os.path.join(artefact, "base_model")
    raise ValueError(f"--base is needed: the adapter in {adapter!r} records no base model "
                     f"(base_model_name_or_path) and is not inside a train-pmol output")


def load_base(base: str):
    """AutoModelForCausalLM.from_pretrained(base) for a folder or a hub id, in eval mode;
    FileNotFoundError naming `base` when it holds no causal LM or cannot be reached."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(base).eval()
    except (OSError, ValueError) as err:
        kind = "folder" if os.path.isdir(base) else "hub id (offline, or not in the cache?)"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(f"--base {base!r}: cannot load a causal LM from this {kind}: "
                                f"{first}") from None


def word_tokenizer_to_hf(vocab: list[str]):
    """moe_ext's whitespace word tokenizer (pmol.tokenizer) as a transformers fast tokenizer
    with the same ids, splitting and decoding (tokens joined by spaces)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", sep_token="<sep>", unk_token="<unk>",
                                   padding_side="left")


def find_tokenizer(base: str, artefact: Optional[str]):
    """The tokenizer of the base (hub id or folder), else the artefact's tokenizer.json (an HF
    tokenizer file, or moe_ext's word vocabulary); None when there is none."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError):
        pass
    path = os.path.join(artefact, TOKENIZER_FILE) if artefact else None
    if path is None or not os.path.isfile(path):
        return None
    data = read_json(path)
    if data.get("type") == "word":
        return word_tokenizer_to_hf(data["vocab"])
    return PreTrainedTokenizerFast(tokenizer_file=path)


def export_adapter(adapter: str, output: str, base: Optional[str] = None,
                   dtype: Optional[str] = None, logits: str = "last") -> dict:
    """Exports adapter + base with export_causal_lm to `output` and saves the tokenizer in
    the same folder (save_pretrained, so AutoTokenizer.from_pretrained(folder) loads it).
    Returns {"output", "base", "adapter", "tokenizer" (folder or None)}."""
    adapter, artefact = resolve_adapter(adapter)
    base = resolve_base(adapter, artefact, base)
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--output {output!r}: folder {folder!r} does not exist")
    model = load_molora(load_base(base), adapter)
    tokenizer = find_tokenizer(base, artefact)
    export_causal_lm(model, output, dtype=dtype, logits=logits)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return {"output": output, "base": base, "adapter": adapter,
            "tokenizer": folder if tokenizer is not None else None}
