"""The moe_ext custom ops (`torch.ops.moe_ext.*`), one module per op family with its typed
wrapper, fake (meta) kernel for torch.compile / export and autograd side by side:

  route.py       route, route_backward     softmax / top-K / renormalise / counts
  align.py       align                     stable counting sort of pairs by expert
  lora.py        lora_forward, _backward   the sparse grouped strategy
  lora_dense.py  lora_dense_forward, _backward   the dense-gated strategy;
                 lora_dense_expand, _backward    its expand alone, from a given h_all
  autocast.py    every op's Autocast kernel: autocast off inside, inputs as given
  checks.py      the fake kernels' argument checks (those of csrc/checks.h)
  reference.py   a pure-PyTorch reference of every op (tests compare against it)
  fallback.py    PyTorch kernels for CUDA tensors when the build has no CUDA kernel

Notation: docs/architecture.md#notation.
"""
from . import autocast, fallback, reference
from .align import align
from .common import acc_dtype
from .lora import lora_sparse, pair_alignment
from .lora_dense import lora_dense, lora_dense_expand
from .route import Routing, route

__all__ = ["Routing", "route", "align", "lora_sparse", "pair_alignment", "lora_dense",
           "lora_dense_expand", "acc_dtype", "reference", "fallback"]
