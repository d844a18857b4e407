"""Per-row preference labels to the group loss: a collator wrapper that takes each
example's `preference` out, collates the rest with the wrapped collator and adds
`preference` (B,) as indices into the model's expert groups. The model's forward takes
that keyword (moe_ext.molora.outputs) and adds PMoL's group loss to `aux_loss`."""
from __future__ import annotations

from typing import Callable, Sequence

import torch


class PreferenceCollator:
    """collate(examples) = inner(examples without "preference") + {"preference": (B,)}.
    A label is a group name of `groups`, an index into it, or None (unlabelled: -1, no
    group loss). Examples without the key pass straight to `inner`."""

    def __init__(self, inner: Callable, groups: Sequence[str]):
        self.inner, self.groups = inner, list(groups)

    def index(self, label) -> int:
        if label is None:
            return -1
        if isinstance(label, str) and label in self.groups:
            return self.groups.index(label)
        if isinstance(label, int) and -1 <= label < len(self.groups):
            return label
        raise ValueError(f"preference label {label!r} is not an expert group of the model; "
                         f"groups: {self.groups}")

    def __call__(self, examples):
        if not examples or "preference" not in examples[0]:
            return self.inner(examples)
        labels = torch.tensor([self.index(e.get("preference")) for e in examples])
        batch = self.inner([{k: v for k, v in e.items() if k != "preference"} for e in examples])
        batch["preference"] = labels
        return batch
