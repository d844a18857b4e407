"""The steps every exporter shares: casting to the export dtype, and running
torch.onnx.export(dynamo=True) with moe_ext's op translations, then writing the ONNX file
with its metadata atomically (weights over EXTERNAL_DATA_BYTES in an external data file)."""
from __future__ import annotations

import copy
import glob
import os
import secrets
from typing import Callable, Optional

import torch
from torch import nn

from moe_ext.molora.quantized import require_float_base
from moe_ext.utils.io import atomic_write, fsync_path
from moe_ext.utils.locking import folder_lock

from .onnx_ops import translation_table
from .tracing import tracing_context


def cast_for_export(model: nn.Module, tensors: list, dtype: Optional[str]):
    """(model, tensors) in `dtype` (None: as they are; "float32" or "float16": a cast copy of
    the model and the floating-point tensors). ValueError for a quantised base: the graph
    needs float weights (moe_ext.molora.quantized)."""
    require_float_base(model, "the ONNX export")
    if dtype not in (None, "float32", "float16"):
        raise ValueError(f"dtype must be None, 'float32' or 'float16', got {dtype!r}")
    if dtype is None:
        return model, tensors
    target = torch.float16 if dtype == "float16" else torch.float32
    return (copy.deepcopy(model).to(target),
            [t.to(target) if t.is_floating_point() else t for t in tensors])


def export_graph(graph: nn.Module, model: nn.Module, tensors: list, names, outputs: list,
                 dynamic_shapes, metadata: dict, path: str, opset: int,
                 edit: Optional[Callable] = None) -> str:
    """Exports `graph` (a wrapper of `model` taking `tensors` positionally) to `path` with
    input names `names`, output names `outputs` and string `metadata`; `edit(proto)` may
    change the ONNX model before it is written; returns the path."""
    import onnx

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"output folder does not exist: {folder!r}")
    was_training = model.training
    model.eval()
    try:
        with tracing_context(), torch.no_grad():
            program = torch.onnx.export(
                graph.eval(), tuple(tensors), dynamo=True, input_names=list(names),
                output_names=list(outputs), opset_version=opset, dynamic_shapes=dynamic_shapes,
                custom_translation_table=translation_table(), optimize=True, verbose=False)
    finally:
        model.train(was_training)
    proto = program.model_proto
    if edit is not None:
        edit(proto)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    write_onnx(proto, path)
    return path


# A serialised ONNX protobuf cannot exceed 2 GiB: models larger than this keep their
# tensors in an external data file beside the .onnx (onnxruntime reads it from there).
EXTERNAL_DATA_BYTES = 1 << 30


def write_onnx(proto, path: str) -> None:
    """Writes `proto` to `path` atomically. Up to EXTERNAL_DATA_BYTES: one file.
    Beyond: the weights go first to a new `<name>.<random>.data` beside it, then the .onnx
    that names it replaces the old one in one rename. Either way the data files of earlier
    saves of `path` are removed last: a crash at any point leaves a .onnx whose data is whole.
    Holds the folder's exclusive lock (moe_ext.utils.locking), so two exports to one path
    never remove each other's data."""
    folder, name = os.path.split(os.path.abspath(path))
    with folder_lock(folder, exclusive=True):  # another export to this folder waits
        _write_onnx(proto, folder, name)


def _write_onnx(proto, folder: str, name: str) -> None:
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data, write_external_data_tensors

    path = os.path.join(folder, name)
    data_name = None
    if proto.ByteSize() > EXTERNAL_DATA_BYTES:  # weights and folded constants alike
        data_name = f"{name}.{secrets.token_hex(6)}.data"
        convert_model_to_external_data(proto, all_tensors_to_one_file=True, location=data_name,
                                       size_threshold=1024, convert_attribute=True)
    try:
        if data_name is not None:
            write_external_data_tensors(proto, folder)  # and clears the tensors' raw_data
            fsync_path(os.path.join(folder, data_name))
        atomic_write(path, lambda tmp: onnx.save(proto, tmp))
    except BaseException:
        if data_name is not None and os.path.exists(os.path.join(folder, data_name)):
            os.remove(os.path.join(folder, data_name))
        raise
    for old in glob.glob(os.path.join(glob.escape(folder), glob.escape(name) + ".*.data")):
        if os.path.basename(old) != data_name:  # earlier saves' data (or a crashed save's)
            os.remove(old)
