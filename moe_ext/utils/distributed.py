"""Saving and loading under sharded data parallelism (FSDP2's `fully_shard`, whose parameters
are DTensors holding one shard per rank).

A sharded model's tensors cannot be written as they are (safetensors would read the local
shard's storage, which FSDP2 frees between forwards: "Attempted to access the data pointer
on an invalid python storage"). The savers gather each DTensor's full value first: a
collective, so every rank calls the saver; rank 0 writes and the other ranks wait at a
barrier until the files are in place. An unsharded model (one process, or DDP with a
copy per rank) is saved by whoever calls, as before, with no collective.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

try:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch built without distributed: nothing is ever sharded
    DTensor = distribute_tensor = FSDPModule = None


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a DTensor (FSDP2 / tensor parallel shards)."""
    return DTensor is not None and isinstance(tensor, DTensor)


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
    """{name: the full value on the CPU, detached and contiguous}: DTensors gathered
    (`full_tensor()`, a collective every rank must join, in the same order), others as
    they are."""
    out = {}
    for name, t in tensors.items():
        t = t.detach()
        if is_sharded(t):
            t = t.full_tensor()
        out[name] = t.contiguous().cpu()
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
    """param.copy_(value) for a plain or sharded param: a DTensor takes its own shard of the
    full `value` (every rank holds the same full value, e.g. read from the same file)."""
    if is_sharded(param):
        value = distribute_tensor(value.to(param.dtype).to(param.device), param.device_mesh,
                                  param.placements, src_data_rank=None)
    param.copy_(value)
