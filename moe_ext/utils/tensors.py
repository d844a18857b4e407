"""Reading saved tensors and checking them before they reach a model: every failure is a
ValueError naming the file and the tensor."""
from __future__ import annotations

from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file


def load_safetensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file; ValueError naming it when it is not one."""
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None


def check_tensor(path: str, key: str, tensor: torch.Tensor,
                 shape: Optional[tuple[int, ...]] = None) -> None:
    """ValueError naming `path` and `key` unless `tensor` is floating point, finite and (if
    given) of `shape`."""
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)} but the model "
                         f"expects {tuple(shape)}")
    if not tensor.is_floating_point():
        raise ValueError(f"{path}: {key} has dtype {tensor.dtype}; expected a floating-point "
                         f"tensor")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{path}: {key} holds NaN or infinite values")
