"""genai_config.json: the file by which onnxruntime-genai (PyPI onnxruntime-genai /
onnxruntime-genai-cuda) loads a folder written by export_causal_lm, with its generic
"decoder" model type: the graph's file, its input and output names (past / present as
printf patterns over the layer index), the cache layout, the token ids, the context length
and the search defaults. onnxruntime-genai refuses keys it does not know, so moe_ext's own
facts (steering groups, MoLoRA config, steerable) stay in the graph's metadata, and its
steering inputs (group_bias, and preference_weights for a steerable adapter) are no
config entries: genai passes them on as extra inputs, fed with generator.set_model_input."""
from __future__ import annotations

import json
import os
from typing import Optional

from moe_ext.utils.io import write_json

from .causal_lm import GROUP_BIAS, PREFERENCE_WEIGHTS, export_causal_lm

CONFIG_NAME = "genai_config.json"
MODEL_NAME = "model.onnx"


def _token_ids(value) -> Optional[object]:
    """An id or a list of ids as genai takes them (an int, or a list for several EOS)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        ids = [int(v) for v in value]
        return ids[0] if len(ids) == 1 else ids
    return int(value)


def genai_config(metadata: dict[str, str], filename: str, hidden_size: int,
                 num_attention_heads: int, context_length: int) -> dict:
    """The genai_config.json dict for a graph with export_causal_lm's `metadata`
    (moe_ext.* keys) stored as `filename` beside it. Search defaults: greedy, max_length
    (prompt + new tokens) = context_length."""
    layout = json.loads(metadata["moe_ext.cache"])
    eos = _token_ids(json.loads(metadata["moe_ext.eos_token_id"]))
    pad = _token_ids(json.loads(metadata["moe_ext.pad_token_id"]))
    bos = _token_ids(json.loads(metadata["moe_ext.bos_token_id"]))
    if eos is None:
        raise ValueError("genai_config: the model has no eos_token_id (config or "
                         "generation_config); onnxruntime-genai needs one")
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    model = {
        "type": "decoder",
        "vocab_size": int(metadata["moe_ext.vocab_size"]),
        "context_length": int(context_length),
        "eos_token_id": eos,
        "pad_token_id": pad,
        "decoder": {
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "filename": filename,
            "head_size": layout["head_dim"],
            "hidden_size": int(hidden_size),
            "num_attention_heads": int(num_attention_heads),
            "num_key_value_heads": layout["num_kv_heads"],
            "num_hidden_layers": layout["num_layers"],
            "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                       "position_ids": "position_ids",
                       "past_key_names": "past_key_values.%d.key",
                       "past_value_names": "past_key_values.%d.value"},
            "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                        "present_value_names": "present.%d.value"},
        },
    }
    if bos is not None:
        model["bos_token_id"] = bos
    # past and present are separate buffers: the graph concatenates the new keys to the
    # past (it is not a shared-buffer GroupQueryAttention graph)
    search = {"do_sample": False, "num_beams": 1, "num_return_sequences": 1,
              "max_length": int(context_length), "min_length": 0, "temperature": 1.0,
              "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0,
              "diversity_penalty": 0.0, "no_repeat_ngram_size": 0, "early_stopping": True,
              "past_present_share_buffer": False}
    return {"model": model, "search": search}


def steering_defaults(proto) -> list[str]:
    """The graph's steering inputs (group_bias, preference_weights) that are also
    initializers (inputs with a default), which onnxruntime-genai never feeds."""
    inputs, initializers = {i.name for i in proto.graph.input}, {t.name for t in proto.graph.initializer}
    return [n for n in (GROUP_BIAS, PREFERENCE_WEIGHTS) if n in inputs and n in initializers]


def write_genai_config(model, onnx_path: str) -> str:
    """Writes genai_config.json beside `onnx_path` (a graph of export_causal_lm exported
    from the transformers `model`), atomically; returns its path."""
    import onnx

    proto = onnx.load(onnx_path, load_external_data=False)
    metadata = {p.key: p.value for p in proto.metadata_props}
    defaulted = steering_defaults(proto)
    if defaulted:
        raise ValueError(f"{onnx_path}: its {' and '.join(defaulted)} input has a default value, "
                         f"and onnxruntime-genai ignores set_model_input for such inputs (steering "
                         f"would do nothing); export with export_folder (or export_causal_lm("
                         f"..., optional_group_bias=False))")
    config = model.config.get_text_config(decoder=True)
    context = int(getattr(config, "max_position_embeddings", None) or 2048)
    folder = os.path.dirname(os.path.abspath(onnx_path))
    path = os.path.join(folder, CONFIG_NAME)
    write_json(path, genai_config(metadata, os.path.basename(onnx_path), config.hidden_size,
                                  config.num_attention_heads, context))
    return path


def export_folder(model, folder: str, tokenizer=None, dtype: Optional[str] = None,
                  logits: str = "last") -> str:
    """The deployable folder of a MoLoRA-injected causal LM: model.onnx (export_causal_lm,
    + external data when large), genai_config.json and, when given, the tokenizer's files
    (save_pretrained: tokenizer.json, tokenizer_config.json, ...), which onnxruntime-genai
    and AutoTokenizer read. The folder is created when missing; returns the graph's path.
    A model with expert groups takes group_bias (1 or B, G) as a required input here
    (genai feeds only inputs without a default): feed zeros for no steering
    (generator.set_model_input("group_bias", np.zeros((1, G), np.float32))); a steerable
    one likewise preference_weights (1 or B, G), zeros for no mix. GenaiCausalLM and
    OrtCausalLM do that themselves."""
    os.makedirs(folder, exist_ok=True)
    path = export_causal_lm(model, os.path.join(folder, MODEL_NAME), dtype=dtype, logits=logits,
                            optional_group_bias=False)
    write_genai_config(model, path)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return path
