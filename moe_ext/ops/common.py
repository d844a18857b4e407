"""What every op module shares: the loaded op library and the accumulation dtype.

Notation (docs/architecture.md#notation): T tokens, D/O in/out features, E LoRA experts,
N null experts, M = E + N router outputs, K experts per token, R LoRA rank, P = T * K pairs.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import warnings

import torch


def _load_extension_override() -> None:
    """MOE_EXT_EXTENSION=path/to/_C.so loads that build of moe_ext._C instead of the in-tree
    one (and no CUDA kernels): `make test-asan` runs the op tests on the sanitizer build this
    way."""
    path = os.environ.get("MOE_EXT_EXTENSION")
    if not path or "moe_ext._C" in sys.modules:
        return
    if not os.path.isfile(path):
        raise RuntimeError(f"MOE_EXT_EXTENSION names {path!r}, which is not a file")
    spec = importlib.util.spec_from_file_location("moe_ext._C", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["moe_ext._C"] = module
    spec.loader.exec_module(module)


def _load_cuda_kernels():
    """moe_ext._C_cuda (the CUDA kernels) where this torch has CUDA and the build made it;
    None otherwise. It links torch's CUDA libraries, so a CPU-only torch never loads it."""
    if torch.version.cuda is None or os.environ.get("MOE_EXT_EXTENSION"):
        return None
    if importlib.util.find_spec("moe_ext._C_cuda") is None:
        return None
    try:
        return importlib.import_module("moe_ext._C_cuda")
    except ImportError as error:  # e.g. built for another CUDA major than this torch's
        warnings.warn(f"moe_ext: the CUDA kernels did not load ({error}); CUDA tensors use the "
                      f"PyTorch fallbacks (moe_ext.ops.fallback). Rebuild moe_ext against this "
                      f"torch's CUDA {torch.version.cuda}.", RuntimeWarning, stacklevel=2)
        return None


_load_extension_override()
from .. import _C  # noqa: E402,F401  (loading the library registers the ops' schemas and kernels)

_C_cuda = _load_cuda_kernels()  # registers the CUDA kernels of the schemas above

lib = torch.ops.moe_ext


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the kernels: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def register_no_derivative(op: str, use_instead: str) -> None:
    """Backward ops have no derivative of their own: differentiating one (inputs that require
    grad) raises a clear error instead of PyTorch's silent zero gradient with a warning.
    Second derivatives come from the forward ops' autograd, whose backward under
    create_graph=True is written in differentiable PyTorch ops."""
    def backward(ctx, *grads):
        raise RuntimeError(f"moe_ext::{op} has no derivative; for second derivatives "
                           f"differentiate {use_instead} with create_graph=True")

    torch.library.register_autograd(f"moe_ext::{op}", backward,
                                    setup_context=lambda ctx, inputs, output: None)
