"""Files written atomically: a temporary file beside the target, then a rename, so that a
reader (or a crash) never sees a half-written file."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Callable, Iterator


def atomic_write(path: str, write: Callable[[str], object]) -> None:
    """Calls write(tmp_path) on a temporary file beside `path`, then renames it over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    """Atomically writes `text` to `path`."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def write_json(path: str, value, indent: int = 2) -> None:
    """Atomically writes `value` as JSON to `path`."""
    write_text(path, json.dumps(value, indent=indent))


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def read_jsonl(path: str) -> Iterator[tuple[int, object]]:
    """(line number, value) for each non-blank line of a JSON Lines file; ValueError naming
    the file and line for a line that is not JSON."""
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
