"""moe_ext::align: the stable counting sort of the (token, k) pairs by expert id. Typed
wrapper and fake kernel (the op has no gradient)."""
from __future__ import annotations

import torch

from . import checks
from .common import lib


def align(experts: torch.Tensor, num_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable counting sort of the P = T*K flattened pairs by expert id.

    Returns order (P,) int64 (pair indices grouped by expert, token order kept inside an
    expert) and offsets (num_bins + 1,) int64 with offsets[b+1] - offsets[b] = count of b.
    """
    return lib.align(experts, int(num_bins))


@torch.library.register_fake("moe_ext::align")
def _align_fake(experts, num_bins):
    checks.align_args(experts, num_bins)
    return (experts.new_empty((experts.numel(),), dtype=torch.int64),
            experts.new_empty((num_bins + 1,), dtype=torch.int64))
