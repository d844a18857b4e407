"""TRL's preference formats, checked and normalised into PreferenceExample rows.

A row is standard (prompt, chosen and rejected are strings) or conversational (they are
lists of {"role", "content"} messages), with an explicit prompt or an implicit one (no
`prompt` field: the prompt is the longest common prefix of chosen and rejected, as TRL's
extract_prompt does). An optional label column names the row's preference (PMoL's expert
group); a missing or null label leaves the row unlabelled. A row may also carry a label per
preference, `preference_labels`: {preference: 1 (chosen is better for it), -1 (rejected is
better) or 0 (a tie, or unknown)}, for training over preference mixes
(moe_ext.pmol.train_pmol with a mix_alpha).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

Messages = list  # list of {"role": str, "content": str}
Text = Union[str, Messages]


@dataclass(frozen=True)
class PreferenceExample:
    """One preference pair. prompt, chosen, rejected: strings (standard format) or lists of
    messages (conversational format); preference: the row's label, None when unlabelled;
    preference_labels: {preference: 1, -1 or 0} (see the module docstring), or None."""
    prompt: Text
    chosen: Text
    rejected: Text
    preference: Optional[Union[str, int]] = None
    preference_labels: Optional[dict] = None

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)


class PreferenceDataError(ValueError):
    """A bad row; the message names the file and line (or row) and the field."""


def _check_messages(value, field: str, where: str) -> list:
    if not isinstance(value, list):
        raise PreferenceDataError(f"{where}: field {field!r} must be a list of messages like the "
                                  f"other fields of this row, got {type(value).__name__}")
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise PreferenceDataError(f"{where}: field {field}[{i}] must be an object with 'role' "
                                      f"and 'content', got {type(msg).__name__}")
        for key in ("role", "content"):
            if not isinstance(msg.get(key), str):
                raise PreferenceDataError(f"{where}: field {field}[{i}].{key} must be a string, "
                                          f"got {type(msg.get(key)).__name__}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def extract_prompt(chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    """Implicit prompt: (prompt, chosen, rejected) with the prompt the longest common prefix
    of chosen and rejected (whole messages, or characters for strings)."""
    n = _common_prefix(chosen, rejected)
    if isinstance(chosen, str) and n > 0 and chosen[n - 1] == " ":
        n -= 1  # the space starts the responses, as in TRL
    return chosen[:n], chosen[n:], rejected[n:]


def parse_row(row, where: str, label_column: Optional[str] = "preference") -> PreferenceExample:
    """A row (dict) of any TRL preference format -> PreferenceExample; PreferenceDataError
    naming `where` and the field for anything else."""
    if not isinstance(row, dict):
        raise PreferenceDataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    for field in ("chosen", "rejected"):
        if field not in row or row[field] is None:
            raise PreferenceDataError(f"{where}: missing field {field!r}")
    conversational = isinstance(row["chosen"], list)
    fields = ("prompt", "chosen", "rejected") if row.get("prompt") is not None else ("chosen", "rejected")
    values = {}
    for field in fields:
        value = row[field]
        if conversational:
            values[field] = _check_messages(value, field, where)
        elif isinstance(value, str):
            values[field] = value
        else:
            raise PreferenceDataError(f"{where}: field {field!r} must be a string (standard "
                                      f"format) or a list of messages (conversational format), "
                                      f"got {type(value).__name__}")
    if "prompt" not in values:
        values["prompt"], values["chosen"], values["rejected"] = extract_prompt(values["chosen"],
                                                                              values["rejected"])
        if not values["chosen"] or not values["rejected"]:
            raise PreferenceDataError(f"{where}: without a 'prompt' field, chosen and rejected "
                                      f"must differ after their common prefix")
    label = row.get(label_column) if label_column else None
    if isinstance(label, bool) or (label is not None and not isinstance(label, (str, int))):
        raise PreferenceDataError(f"{where}: field {label_column!r} must be a string, an integer "
                                  f"or null, got {type(label).__name__}")
    return PreferenceExample(values["prompt"], values["chosen"], values["rejected"], label,
                             check_preference_labels(row.get("preference_labels"), where))


def check_preference_labels(labels, where: str) -> Optional[dict]:
    """A row's `preference_labels` ({name: 1, -1 or 0}, or null) checked;
    PreferenceDataError naming `where` otherwise."""
    if labels is None:
        return None
    if not isinstance(labels, dict) or not all(
            isinstance(k, str) and k and not isinstance(v, bool) and v in (1, -1, 0)
            for k, v in labels.items()):
        raise PreferenceDataError(f"{where}: field 'preference_labels' must map preference names "
                                  f"to 1 (chosen better), -1 (rejected better) or 0 (tie), got "
                                  f"{labels!r}")
    return {k: int(v) for k, v in labels.items()}


def flatten(text: Text) -> str:
    """A conversational field as plain text ("role: content" lines); strings unchanged."""
    if isinstance(text, str):
        return text
    return "\n".join(f"{m['role']}: {m['content']}" for m in text)
