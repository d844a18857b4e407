"""Reading preference rows from JSON Lines, JSON, Parquet or a Hugging Face `datasets`
folder or name, each row with where it came from (file:line, or file row N) so that a bad
row's error can name it. Parquet and `datasets` need the optional `datasets` extra
(pyarrow)."""
from __future__ import annotations

import json
import os
from typing import Iterator, Optional

from ..utils.io import read_jsonl
from .rows import PreferenceDataError, PreferenceExample, parse_row

SAVE_TO_DISK_MARKERS = ("state.json", "dataset_dict.json")  # datasets' save_to_disk


def _json_rows(path: str) -> Iterator[tuple[str, object]]:
    """A .json file: one array of objects, or JSON Lines under a .json name (what
    datasets' to_json writes)."""
    with open(path) as f:
        text = f.read()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        yield from ((f"{path}:{n}", row) for n, row in read_jsonl(path))
        return
    except RecursionError:
        raise PreferenceDataError(f"{path}: JSON nested too deeply to hold rows") from None
    if isinstance(value, dict):  # a single JSON object is one row in JSON Lines too
        yield f"{path}:1", value
        return
    if not isinstance(value, list):
        raise PreferenceDataError(f"{path}: expected a JSON array of rows, got {type(value).__name__}")
    for i, row in enumerate(value):
        yield f"{path} row {i}", row


def _parquet_rows(path: str) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet as pq  # optional extra (datasets)

    for i, row in enumerate(pq.read_table(path).to_pylist()):
        yield f"{path} row {i}", row


def _dataset_rows(source: str, split: str) -> Iterator[tuple[str, object]]:
    import datasets  # optional extra

    datasets.disable_progress_bars()
    try:
        if os.path.isdir(source) and any(os.path.isfile(os.path.join(source, m)) for m in SAVE_TO_DISK_MARKERS):
            data = datasets.load_from_disk(source)
        else:
            data = datasets.load_dataset(source, split=split)
    except (FileNotFoundError, ConnectionError, ValueError) as err:
        raise PreferenceDataError(f"cannot load dataset {source!r} (split {split!r}): {err}") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise PreferenceDataError(f"dataset {source!r} has no split {split!r}; it has {sorted(data)}")
        data = data[split]
    for i, row in enumerate(data):
        yield f"dataset {source!r} ({split}) row {i}", row


def read_rows(source: str, split: str = "train") -> Iterator[tuple[str, object]]:
    """(where, row) for each row of `source`: a .jsonl / .json / .parquet file, a folder
    written by datasets' save_to_disk or holding data files, or a dataset name."""
    lower = source.lower()
    if os.path.isfile(source):
        if lower.endswith(".parquet"):
            return _parquet_rows(source)
        if lower.endswith(".json"):
            return _json_rows(source)
        return ((f"{source}:{n}", row) for n, row in read_jsonl(source))
    if os.path.isdir(source):
        return _dataset_rows(source, split)
    if lower.endswith((".jsonl", ".json", ".parquet")):
        raise FileNotFoundError(f"preference data file not found: {source!r}")
    return _dataset_rows(source, split)


def load_preferences(source: str, label_column: Optional[str] = "preference",
                     split: str = "train") -> list[PreferenceExample]:
    """Every row of `source` (see read_rows) in any TRL preference format as a
    PreferenceExample; PreferenceDataError (a ValueError) naming the file, line and field
    of a bad row, FileNotFoundError for a missing file."""
    examples = [parse_row(row, where, label_column) for where, row in read_rows(source, split)]
    if not examples:
        raise PreferenceDataError(f"{source}: no rows")
    return examples
