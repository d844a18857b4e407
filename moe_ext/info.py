"""Build facts: which ops have CPU and CUDA kernels, the CUDA archs, versions (`moe-ext info`
and the demo summary)."""
from __future__ import annotations

import json
import platform

import torch

from . import _C, ops  # noqa: F401  (ops registers the fake kernels and autograd)
from .ops.common import _C_cuda
from .ops.fallback import REGISTERED
from .version import __version__

OP_NAMES = ["route", "route_backward", "align", "lora_forward", "lora_backward",
            "lora_dense_forward", "lora_dense_backward", "lora_dense_expand",
            "lora_dense_expand_backward"]


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"moe_ext::{op}", key)


def cuda_archs(built: str) -> dict:
    """The CUDA code in the build ("80;90a;80+PTX"): SASS archs, PTX archs, and how this
    machine's GPU runs it: "SASS sm_NN", "PTX compute_NN (JIT)" or "no kernel image"."""
    sass, ptx = [], []
    for arch in filter(None, built.split(";")):
        number = arch.removesuffix("+PTX")
        sass.append(f"sm_{number}")
        if arch.endswith("+PTX"):
            ptx.append(f"compute_{number}")
    info = {"sass": list(dict.fromkeys(sass)), "ptx": ptx, "this_gpu": None}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        exact = f"sm_{major}{minor}"
        # SASS runs on GPUs of its major and a minor at least its own, arch-specific ("a")
        # SASS only on its own GPU; PTX JITs for any GPU at least as new.
        def version(arch: str) -> tuple[int, int]:
            digits = arch.split("_")[1].rstrip("af")
            return int(digits[:-1]), int(digits[-1])

        fits = [s for s in info["sass"] if version(s) == (major, minor) or (
                not s.endswith("a") and version(s)[0] == major and version(s)[1] <= minor)]
        jit = [p for p in ptx if version(p) <= (major, minor)]
        info["this_gpu"] = (f"{exact}: SASS {fits[0]}" if fits else
                            f"{exact}: PTX {jit[-1]} (JIT-compiled at first use)" if jit else
                            f"{exact}: no kernel image")
    return info


def build_info() -> dict:
    """What the installed extension holds: kernels per device, CUDA archs, versions."""
    built = json.loads(_C.build_info())
    archs = cuda_archs(_C_cuda.cuda_archs()) if _C_cuda is not None else None
    return {
        "moe_ext": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "built_with_cuda": _C_cuda is not None,
        "built_cuda_archs": _C_cuda.cuda_archs() if _C_cuda is not None else "",
        "cuda_sass": archs["sass"] if archs else [],
        "cuda_ptx": archs["ptx"] if archs else [],
        "cuda_this_gpu": archs["this_gpu"] if archs else None,
        "built_against_torch": built["torch_version"],
        "stable_abi_target": built["stable_abi_target"],
        "compiler": built["compiler"],
        "cpu_kernels": [n for n in OP_NAMES if _has_kernel(n, "CPU")],
        "cuda_kernels": [n for n in OP_NAMES if _has_kernel(n, "CUDA") and n not in REGISTERED],
        "cuda_pytorch_fallbacks": list(REGISTERED),
        "cuda_available": torch.cuda.is_available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }
