"""Files written atomically: a temporary file beside the target, flushed to disk, then a
rename, so that a reader (or a crash, or a power cut) never sees a half-written file.
Temporaries left by a killed writer are removed by the next write to the same target."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
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


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temporary_name(name: str) -> str:
    """A temporary's name for `name` in the same folder: .tmp-<pid>-<random>-<name> (the
    pid tells later writers whether its writer is gone)."""
    return f"{_TMP}{os.getpid()}-{os.urandom(4).hex()}-{name}"


def remove_path(path: str) -> None:
    """Removes a file or a folder tree; nothing if it is gone already."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    except OSError:
        pass  # another writer cleaned it up first


def remove_stale_temporaries(path: str) -> None:
    """Removes the temporaries of earlier writes of `path` whose writer process is gone."""
    folder, name = os.path.split(os.path.abspath(path))
    remove_stale_temporaries_in(folder, "-" + name)


def remove_stale_temporaries_in(folder: str, suffix: str = "") -> None:
    """Removes every temporary file or folder in `folder` (whose name ends in `suffix`)
    left by a writer process that is gone."""
    if not os.path.isdir(folder):
        return
    for entry in os.listdir(folder):
        if not (entry.startswith(_TMP) and entry.endswith(suffix)):
            continue
        pid = entry[len(_TMP):].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            remove_path(os.path.join(folder, entry))


def umask_mode() -> int:
    """The mode a new file gets from the process's umask (0o666 & ~umask): saved files
    follow it, whatever mode the library that wrote them chose (mkstemp: 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str, write: Callable[[str], object]) -> None:
    """Calls write(tmp_path) on a temporary file in a private folder beside `path`
    (.tmp-<pid>-<random>-<name>/), flushes it to disk and renames it over `path` (then
    flushes the folder, so the rename itself is durable). The private folder catches the
    writing library's own temporaries too (safetensors' .tmpXXXXXX): a killed write
    leaves one folder, which the next write removes."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(path)
    private = tempfile.mkdtemp(dir=folder, prefix=f"{_TMP}{os.getpid()}-",
                               suffix="-" + os.path.basename(path))
    tmp = os.path.join(private, os.path.basename(path))
    try:
        write(tmp)
        os.chmod(tmp, umask_mode())  # libraries write owner-only files; a save follows the umask
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        remove_path(private)
    fsync_path(folder)


def writes_into(path: str, folder: str) -> bool:
    """Whether writing the file `path` (and files beside it) writes into the existing
    folder `folder` or a folder under it (symbolic links resolved)."""
    if not os.path.isdir(folder):
        return False
    where = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    root = os.path.realpath(folder)
    return where == root or where.startswith(root.rstrip(os.sep) + os.sep)


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
    """The JSON value in `path`; ValueError naming the file when it is not JSON."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    except RecursionError:  # arrays or objects nested thousands deep: no config is
        raise ValueError(f"{path}: JSON nested too deeply to be a config") from None


MAX_JSONL_LINE = 16 << 20  # bytes; one preference row is far smaller


def read_jsonl(path: str, max_line_bytes: int = MAX_JSONL_LINE) -> Iterator[tuple[int, object]]:
    """(line number, value) for each non-blank line of a JSON Lines file; ValueError naming
    the file and line for a line that is not JSON or longer than max_line_bytes (read no
    further than that, so a huge line costs no memory)."""
    with open(path, "rb") as f:
        lineno = 0
        while True:
            raw = f.readline(max_line_bytes + 1)
            if not raw:
                return
            lineno += 1
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                raise ValueError(f"{path}:{lineno}: line longer than {max_line_bytes} bytes "
                                 f"(not a preference row; is this a JSON Lines file?)")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            except RecursionError:
                raise ValueError(f"{path}:{lineno}: JSON nested too deeply to be a row") from None
            yield lineno, value
