"""moe_ext.export: ONNX export of MoLoRA models and reward models, and an onnxruntime
session wrapper.

    to_onnx(model, "model.onnx", {"input_ids": ids, "attention_mask": mask})
    OrtModel("model.onnx")(input_ids=ids, attention_mask=mask)["logits"]

Exported graphs use standard ONNX ops only (see onnx_ops.py), with dynamic batch and
sequence dimensions; the MoLoRA or reward-model config is stored in the model metadata.
"""
from .ort import OrtModel
from .to_onnx import KINDS, to_onnx

__all__ = ["to_onnx", "OrtModel", "KINDS"]
