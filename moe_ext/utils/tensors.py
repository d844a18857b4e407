"""Reading saved tensors and checking them before they reach a model: every failure is a
ValueError naming the file and the tensor."""
from __future__ import annotations

import hashlib
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load


def load_safetensors(path: str, sha256: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file; ValueError naming it when it is not one. With
    `sha256` (the digest a config recorded), the bytes read are the bytes checked: a save
    that replaced the file after the config was verified is an error, never a mix."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{path} does not match the SHA-256 its config records (saved again "
                         f"during this load?); load again")
    try:
        return load(data)
    except SafetensorError as err:
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
