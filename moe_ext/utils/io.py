"""Files written atomically: a temporary file beside the target, flushed to disk, then a
rename, so that a reader (or a crash, or a power cut) never sees a half-written file.
Temporaries left by a killed writer are removed by the next write to the same target."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Callable, Iterator

_TMP = ".tmp-"


def fsync_path(path: str) -> None:
    """Flushes a file's or a folder's contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(path: str) -> None:
    """Removes the temporaries of earlier writes of `path` whose writer process is gone."""
    folder, name = os.path.split(os.path.abspath(path))
    if not os.path.isdir(folder):
        return
    for entry in os.listdir(folder):
        if not (entry.startswith(_TMP) and entry.endswith("-" + name)):
            continue
        pid = entry[len(_TMP):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            try:
                os.remove(os.path.join(folder, entry))
            except OSError:
                pass  # another writer cleaned it up first


def atomic_write(path: str, write: Callable[[str], object]) -> None:
    """Calls write(tmp_path) on a temporary file beside `path`, flushes it to disk and
    renames it over `path` (then flushes the folder, so the rename itself is durable)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{_TMP}{os.getpid()}-",
                               suffix="-" + os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_path(folder)


def sha256_file(path: str) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
