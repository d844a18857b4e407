"""Per-row preference labels to the group loss: a collator wrapper that takes each
example's `preference` out, collates the rest with the wrapped collator and adds
`preference` (B,) as indices into the model's expert groups. The model's forward takes
that keyword (moe_ext.molora.outputs) and adds PMoL's group loss to `aux_loss`.

For training over preference mixes (MoLoRADPOTrainer's mix_alpha) it also turns each
row's labels per group into `preference_labels` (B, G): the row's `preference_labels`
({group: 1, -1 or 0}, or that dict as a JSON string) where given, else +1 at its own
`preference` and 0 elsewhere (moe_ext.pmol.data.preference_labels)."""
from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Callable, Sequence

import torch

from ..data.rows import check_preference_labels
from ..pmol.data import preference_labels

PREFERENCE, PREFERENCE_LABELS = "preference", "preference_labels"


class PreferenceCollator:
    """collate(examples) = inner(examples without "preference" and "preference_labels") +
    {"preference": (B,)} [+ {"preference_labels": (B, G) int64} with multi_labels]. A label
    is a group name of `groups`, an index into it, or None (unlabelled: -1, no group loss).
    Examples without either key pass straight to `inner`."""

    def __init__(self, inner: Callable, groups: Sequence[str], multi_labels: bool = False):
        self.inner, self.groups, self.multi_labels = inner, list(groups), multi_labels

    def index(self, label) -> int:
        if label is None:
            return -1
        if isinstance(label, str) and label in self.groups:
            return self.groups.index(label)
        if isinstance(label, int) and -1 <= label < len(self.groups):
            return label
        raise ValueError(f"preference label {label!r} is not an expert group of the model; "
                         f"groups: {self.groups}")

    def labels(self, value, where: str):
        """A row's preference_labels (dict, JSON string or None) checked: {group: 1 | -1 | 0}
        or None. Keys a dataset column fills with None for this row (Arrow structs hold
        every row's keys) are left out: unknown, 0."""
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: preference_labels is not valid JSON: {value!r}") from e
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if v is not None}
        value = check_preference_labels(value, where)
        unknown = sorted(set(value or ()) - set(self.groups))
        if unknown:
            raise ValueError(f"{where}: preference_labels names {unknown}, which are not expert "
                             f"groups of the model; groups: {self.groups}")
        return value

    def __call__(self, examples):
        if not examples or not {PREFERENCE, PREFERENCE_LABELS} & set(examples[0]):
            return self.inner(examples)
        index = [self.index(e.get(PREFERENCE)) for e in examples]
        batch = self.inner([{k: v for k, v in e.items() if k not in (PREFERENCE, PREFERENCE_LABELS)}
                            for e in examples])
        if PREFERENCE in examples[0]:
            batch[PREFERENCE] = torch.tensor(index)
        if self.multi_labels:
            rows = [SimpleNamespace(preference=self.groups[i] if i >= 0 else None,
                                    preference_labels=self.labels(e.get(PREFERENCE_LABELS), f"batch row {n}"))
                    for n, (e, i) in enumerate(zip(examples, index))]
            batch[PREFERENCE_LABELS] = preference_labels(rows, self.groups)
        return batch
