"""What every op module shares: the loaded op library and the accumulation dtype.

Notation (docs/architecture.md#notation): T tokens, D/O in/out features, E LoRA experts,
N null experts, M = E + N router outputs, K experts per token, R LoRA rank, P = T * K pairs.
"""
from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loading the library registers the ops' schemas and kernels)

lib = torch.ops.moe_ext


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the kernels: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
