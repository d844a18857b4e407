"""Saving and loading under sharded data parallelism: FSDP2's `fully_shard` (parameters are
DTensors holding one shard per rank) and DeepSpeed ZeRO-3 (each parameter's data is an
empty tensor outside forward; its shard lives in `param.ds_tensor`).

A sharded model's tensors cannot be written as they are (FSDP2: safetensors would read the
local shard's storage, which FSDP2 frees between forwards: "Attempted to access the data
pointer on an invalid python storage"; ZeRO-3: the file would silently hold empty
tensors). The savers gather each tensor's full value first: a collective, so every rank
calls the saver; rank 0 writes and the other ranks wait at a barrier until the files are
in place. An unsharded model (one process, or DDP with a copy per rank) is saved by
whoever calls, as before, with no collective. Savers pass the parameters themselves
(not detached copies, which lose ZeRO-3's attributes).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.distributed as dist

try:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch built without distributed: nothing is ever sharded
    DTensor = distribute_tensor = FSDPModule = None


def is_zero3(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a parameter partitioned by DeepSpeed ZeRO-3."""
    return hasattr(tensor, "ds_id") and hasattr(tensor, "ds_shape")


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a DTensor (FSDP2 / tensor parallel shards) or a ZeRO-3 parameter."""
    return (DTensor is not None and isinstance(tensor, DTensor)) or is_zero3(tensor)


def full_shape(tensor: torch.Tensor) -> tuple:
    """The shape of the full tensor (a ZeRO-3 parameter's own .shape is its empty data's)."""
    return tuple(tensor.ds_shape) if is_zero3(tensor) else tuple(tensor.shape)


@contextlib.contextmanager
def zero3_gathered(tensors, modifier_rank=None) -> Iterator[None]:
    """Inside the block every ZeRO-3 parameter among `tensors` holds its full value (a
    collective: every rank enters). modifier_rank=0: what rank 0 writes into them is
    broadcast and partitioned again on exit."""
    params = [t for t in tensors if is_zero3(t)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def class_name(module) -> str:
    """The module's own class name: fully_shard swaps a module's class for a subclass
    "FSDP<name>", which saved files must not record (nor loads compare against)."""
    cls = type(module)
    if FSDPModule is not None and issubclass(cls, FSDPModule):
        cls = next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))
    return cls.__name__


def any_sharded(tensors: dict) -> bool:
    return any(is_sharded(t) for t in tensors.values())


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: the full value on the CPU, detached, contiguous and owning its memory}:
    DTensors gathered (`full_tensor()`) and ZeRO-3 parameters too (one GatheredParameters
    over all of them), collectives every rank must join in the same order; others as they
    are."""
    out = {}
    with zero3_gathered(tensors.values()):
        for name, t in tensors.items():
            t = t.detach()
            if DTensor is not None and isinstance(t, DTensor):
                t = t.full_tensor()
            out[name] = t.contiguous().cpu().clone() if is_zero3(tensors[name]) else t.contiguous().cpu()
    return out


def write_once(write: Callable[[], None], sharded: bool) -> None:
    """Calls write() on rank 0 only when the model is sharded (every rank got here), and
    makes the other ranks wait until it is done; otherwise calls it here."""
    if not (sharded and dist.is_initialized() and dist.get_world_size() > 1):
        write()
        return
    error = None
    if dist.get_rank() == 0:
        try:
            write()
        except Exception as err:  # the other ranks must not wait forever at the barrier
            error = err
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    failed = torch.tensor([error is not None], dtype=torch.int32, device=device)
    dist.all_reduce(failed)  # also the barrier: no rank goes on before the files are written
    if error is not None:
        raise error
    if failed.item():
        raise RuntimeError("saving failed on rank 0 (see its error)")


def copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """param.copy_(value) for a plain or a DTensor param, which takes its own shard of the
    full `value` (every rank holds the same full value, e.g. read from the same file).
    ZeRO-3 parameters: call inside zero3_gathered(..., modifier_rank=0)."""
    if DTensor is not None and isinstance(param, DTensor):
        value = distribute_tensor(value.to(param.dtype).to(param.device), param.device_mesh,
                                  param.placements, src_data_rank=None)
    param.copy_(value)
