"""export_adapter: a saved MoLoRA adapter + its base model (hub id or folder) to a generation
graph, with the tokenizer written beside it (what `moe-ext export --adapter` runs).

The adapter may be an adapter folder (adapter_config.json + adapter_model.safetensors) or
a PMoL artefact folder (adapter/ and base_model/, each with the tokenizer, as written by
moe_ext.pmol.run_pmol_job). The base defaults to the one the adapter records
(`base_model_name_or_path` in adapter_config.json, PEFT's key), else to the artefact's
base_model/ folder.
"""
from __future__ import annotations

import os
from typing import Optional

from moe_ext.hf.models import load_adapter_tokenizer, load_pretrained
from moe_ext.molora import load_molora, read_adapter_meta
from moe_ext.molora.saving import CONFIG_NAME
from moe_ext.utils.io import writes_into

from .causal_lm import export_causal_lm
from .genai_config import MODEL_NAME, write_genai_config

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
    """The base model: `base` if given, else the train-pmol output's own base_model/ (a
    copied output must not load the original's), else what the adapter records."""
    if base:
        return base
    if artefact is not None:
        return os.path.join(artefact, "base_model")
    recorded = read_adapter_meta(adapter).get("base_model_name_or_path")
    if recorded:
        return recorded
    raise ValueError(f"--base is needed: the adapter in {adapter!r} records no base model "
                     f"(base_model_name_or_path) and is not inside a train-pmol output")


def load_base(base: str):
    """The causal LM `base` (folder or hub id) in eval mode; OSError naming --base when it
    cannot be loaded."""
    try:
        return load_pretrained(base).eval()
    except OSError as err:
        raise OSError(f"--base {base!r}: {err}") from None


def find_tokenizer(adapter: str, base: str):
    """The tokenizer saved beside the adapter, else the base's; None when there is none."""
    try:
        return load_adapter_tokenizer(adapter, base)
    except (OSError, ValueError):
        return None


def export_adapter(adapter: str, output: str, base: Optional[str] = None,
                   dtype: Optional[str] = None, logits: str = "last") -> dict:
    """Exports adapter + base with export_causal_lm and writes, beside the graph,
    genai_config.json (onnxruntime-genai loads the folder as it is) and the tokenizer
    (save_pretrained, so AutoTokenizer.from_pretrained(folder) and onnxruntime-genai read
    it). `output`: a folder (the graph is FOLDER/model.onnx; created when missing) or a
    .onnx file in an existing folder (genai_config.json names it).
    Returns {"output" (the graph), "folder", "base", "adapter", "tokenizer" (folder or None)}."""
    adapter, artefact = resolve_adapter(adapter)
    base = resolve_base(adapter, artefact, base)
    if output.endswith(".onnx"):
        folder = os.path.dirname(os.path.abspath(output))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"--output {output!r}: folder {folder!r} does not exist")
    else:
        folder, output = output, os.path.join(output, MODEL_NAME)
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise ValueError(f"--output {folder!r}: exists and is not a folder")
    for what, source in (("adapter", adapter), ("train-pmol output", artefact), ("base model", base)):
        if source and writes_into(output, source):  # the graph, its data, the tokenizer
            raise ValueError(f"--output {output!r} is inside the {what} folder {source!r} that "
                             f"the export reads (its files could be replaced); write it elsewhere")
    model = load_molora(load_base(base), adapter)
    tokenizer = find_tokenizer(adapter, base)
    os.makedirs(folder, exist_ok=True)
    export_causal_lm(model, output, dtype=dtype, logits=logits, optional_group_bias=False)
    write_genai_config(model, output)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return {"output": output, "folder": folder, "base": base, "adapter": adapter,
            "tokenizer": folder if tokenizer is not None else None}
