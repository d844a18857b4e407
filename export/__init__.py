"""moe_ext.export: ONNX export of MoLoRA models and reward models, and onnxruntime
inference.

    to_onnx(model, "model.onnx", {"input_ids": ids, "attention_mask": mask})
    OrtModel("model.onnx")(input_ids=ids, attention_mask=mask)["logits"]

    export_causal_lm(model, "lm.onnx")            # generation graph: KV cache, steering input
    OrtCausalLM("lm.onnx").generate(ids, mask, max_new_tokens=32, steer={"safe": 2.0})

Exported graphs use standard ONNX ops only (see onnx_ops.py), with dynamic batch and
sequence dimensions; the MoLoRA or reward-model config is stored in the model metadata.
"""
from .causal_lm import export_causal_lm
from .generate import GenerateOutput
from .ort import OrtModel
from .ort_causal_lm import CausalLMStep, KVCache, OrtCausalLM
from .to_onnx import KINDS, to_onnx

__all__ = ["to_onnx", "OrtModel", "KINDS", "export_causal_lm", "OrtCausalLM", "KVCache",
           "CausalLMStep", "GenerateOutput"]
