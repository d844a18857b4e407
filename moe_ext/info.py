"""Build facts: which ops have CPU and CUDA kernels, the CUDA archs, versions (`moe-ext info`
and the demo summary)."""
from __future__ import annotations

import json
import platform

import torch

from . import _C, ops  # noqa: F401  (ops registers the fake kernels and autograd)
from .ops.fallback import REGISTERED
from .version import __version__

OP_NAMES = ["route", "route_backward", "align", "lora_forward", "lora_backward",
            "lora_dense_forward", "lora_dense_backward", "lora_dense_expand",
            "lora_dense_expand_backward"]


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"moe_ext::{op}", key)


def build_info() -> dict:
    """What the installed extension holds: kernels per device, CUDA archs, versions."""
    built = json.loads(_C.build_info())
    return {
        "moe_ext": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "built_with_cuda": built["with_cuda"],
        "built_cuda_archs": built["cuda_archs"],
        "built_against_torch": built["torch_version"],
        "compiler": built["compiler"],
        "cpu_kernels": [n for n in OP_NAMES if _has_kernel(n, "CPU")],
        "cuda_kernels": [n for n in OP_NAMES if _has_kernel(n, "CUDA") and n not in REGISTERED],
        "cuda_pytorch_fallbacks": list(REGISTERED),
        "cuda_available": torch.cuda.is_available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }
