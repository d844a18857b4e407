"""Autocast kernels of every moe_ext op: run the op with autocast off, on its inputs as given.

Under `torch.autocast` a call reaches the dispatcher's Autocast key before the CPU / CUDA
kernel. With nothing registered there the autocast state stays on inside the kernel, so the
ATen GEMMs a kernel calls itself (the dense strategy's `at::mm` in accumulation dtype) come
back in bf16 / fp16 and the kernel's own dtype dispatch then fails (`"lora_dense_expand_cpu"
not implemented for 'BFloat16'`), or silently computes in half precision. These kernels
exclude the Autocast key for the call (as `torch.library.register_autocast` does, but
without its cast of every floating input to one dtype: the gate weights must stay in the
accumulation dtype) and redispatch, so the kernels see the dtypes the caller passed and
keep fp32 accumulation. Callers choose the dtype: MoLoRALinear casts x and the experts to
the autocast dtype itself (layer.py).

Each op gets an Autocast kernel in C++'s dispatch table (eager calls) and a Python one
(`py_impl`, used when torch.compile / torch.export trace through the Python dispatcher).
"""
from __future__ import annotations

import torch

from .common import lib  # noqa: F401  (the ops' schemas, registered by the extension)

OPS = ("route", "route_backward", "align", "lora_forward", "lora_backward", "lora_dense_forward",
       "lora_dense_backward", "lora_dense_expand", "lora_dense_expand_backward")
DEVICE_TYPES = ("cpu", "cuda")

_LIB = torch.library.Library("moe_ext", "IMPL")  # keeps the registrations alive


def _register(name: str, device_type: str) -> None:
    op = getattr(torch.ops.moe_ext, name).default
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    key = getattr(torch._C.DispatchKey, key_name)
    excluded = torch._C.DispatchKeySet(key)

    def run_as_given(*args):
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*args)

    if op.has_kernel_for_dispatch_key(key):  # a re-import: replace the Python kernel
        op.py_kernels.pop(key)
    op.py_impl(key)(run_as_given)
    _LIB.impl(name, lambda _keyset, *args: run_as_given(*args), key_name, with_keyset=True)


def register_autocast_kernels() -> None:
    """Registers the Autocast kernel of every op for every device type that has autocast."""
    for device_type in DEVICE_TYPES:
        if torch.amp.is_autocast_available(device_type):
            for name in OPS:
                _register(name, device_type)


register_autocast_kernels()
