"""Saving a folder of weights and config as one step, and loading it back verified.

commit_save writes each file of the save (the weights, small JSON files) as
.pending-<name>, flushed to disk, then the new config, which carries the SHA-256 of every
file ("sha256"), as .pending-<config>; then it renames the files into place and the
pending config over the config last. A process killed at any point leaves either
  - the old config matching the old files (killed before the first rename), or
  - a pending config whose files are all there, as pending or final files (killed
    during the renames): read_verified_config finishes those renames and reads it,
so a load sees the old or the new save, never a mix. The next save (begin_save) finishes
or discards what a killed save left, and removes its temporaries. A config without
"sha256" (PEFT's, older moe_ext versions') loads as it is.

Files written before commit_save (a tokenizer, a transformers save_pretrained folder) go
through move_changed_files: into a temporary folder first, then each file whose bytes
changed is renamed into place, so saving the same tokenizer or frozen base model again
never opens a window where they are torn; commit_save records the checksums of those that
hold weights (in_place), so a torn one is named at load time.
"""
from __future__ import annotations

import filecmp
import os
import tempfile
from typing import Callable, Optional

from .io import (fsync_path, read_json, remove_path, remove_stale_temporaries_in, sha256_file,
                 temporary_name, write_json)

PENDING = ".pending-"
CHECKSUMS = "sha256"  # the config's key: {file name (relative to the folder): hex digest}


def _pending(directory: str, name: str) -> str:
    return os.path.join(directory, PENDING + name)


def _matches(directory: str, name: str, digest: str, pending_ok: bool) -> bool:
    for path in ([os.path.join(directory, name)] +
                 ([_pending(directory, name)] if pending_ok and "/" not in name else [])):
        if os.path.isfile(path) and sha256_file(path) == digest:
            return True
    return False


def _first_mismatch(directory: str, sums: dict, pending_ok: bool = False) -> Optional[str]:
    """The first file whose checksum differs from `sums` (or that is missing); with
    pending_ok its .pending- version may match instead."""
    for name, digest in sums.items():
        if not _matches(directory, name, digest, pending_ok):
            return os.path.join(directory, name)
    return None


def _read_pending(directory: str, config_name: str) -> Optional[dict]:
    """The pending config of an interrupted save if all of its files are there (as final or
    .pending- files), else None."""
    path = _pending(directory, config_name)
    if not os.path.isfile(path):
        return None
    try:
        meta = read_json(path)
    except (ValueError, OSError):
        return None
    sums = meta.get(CHECKSUMS) if isinstance(meta, dict) else None
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        return None
    try:
        for name in sums:
            safe_member(directory, name, path)
    except ValueError:
        return None
    return None if _first_mismatch(directory, sums, pending_ok=True) else meta


def _finish(directory: str, config_name: str, meta: dict) -> None:
    """The renames of a save whose pending files and config are on disk. A reader may
    finish a save while its writer is still renaming: a pending file that is gone was moved
    into place by the other one, so it is skipped rather than an error."""
    for name in meta[CHECKSUMS]:
        pending = _pending(directory, name)
        if "/" not in name and os.path.isfile(pending) and \
                sha256_file(pending) == meta[CHECKSUMS][name]:
            _replace_if_there(pending, os.path.join(directory, name))
    fsync_path(directory)
    _replace_if_there(_pending(directory, config_name), os.path.join(directory, config_name))
    fsync_path(directory)


def _replace_if_there(src: str, dst: str) -> None:
    try:
        os.replace(src, dst)
    except FileNotFoundError:
        if not os.path.exists(dst):
            raise


def _config_matches(directory: str, config_name: str) -> bool:
    try:
        meta = read_json(os.path.join(directory, config_name))
    except (ValueError, OSError):
        return False
    sums = meta.get(CHECKSUMS) if isinstance(meta, dict) else None
    return not isinstance(sums, dict) or _first_mismatch(directory, sums) is None


def begin_save(directory: str, config_name: str) -> None:
    """Creates `directory`; finishes a killed save whose files are all on disk when the
    current config does not match its files, and removes the .pending- files and the
    temporaries of killed saves."""
    os.makedirs(directory, exist_ok=True)
    if not _config_matches(directory, config_name):
        meta = _read_pending(directory, config_name)
        if meta is not None:
            _finish(directory, config_name, meta)
    for entry in os.listdir(directory):
        if entry.startswith(PENDING):
            remove_path(os.path.join(directory, entry))
    remove_stale_temporaries_in(directory)


def commit_save(directory: str, config_name: str, meta: dict,
                files: dict[str, Callable[[str], object]], in_place: tuple[str, ...] = ()) -> None:
    """Writes a save in one step (see the module docstring; call begin_save first): `files`
    maps file names in `directory` (no subfolders) to write(path) functions; `in_place`
    names weights files already written (by move_changed_files) whose checksums the
    config records too. The config is meta + {"sha256": {name: digest}}."""
    sums = {}
    for name, write in files.items():
        if os.path.basename(name) != name:
            raise ValueError(f"commit_save writes files of the folder itself, got {name!r}")
        path = _pending(directory, name)
        write(path)
        fsync_path(path)
        sums[name] = sha256_file(path)
    sums.update({name: sha256_file(os.path.join(directory, name)) for name in in_place})
    new = {**meta, CHECKSUMS: sums}
    write_json(_pending(directory, config_name), new)
    _finish(directory, config_name, new)


def safe_member(directory: str, name, what: str) -> str:
    """directory/name for a file name read from a config; ValueError when `name` is not a
    string or would leave `directory` by its name (absolute, ".."). A file that is a
    symbolic link is followed: Hugging Face's cache links snapshot files to its blobs."""
    if not isinstance(name, str) or not name or os.path.isabs(name):
        raise ValueError(f"{what}: {name!r} is not a file name inside {directory!r}")
    relative = os.path.normpath(name)
    if relative == "." or relative.split(os.sep)[0] == "..":
        raise ValueError(f"{what}: {name!r} leaves the folder {directory!r}")
    return os.path.join(directory, relative)


def read_verified_config(directory: str, config_name: str) -> dict:
    """The config `config_name` of a folder written by commit_save, checked against the
    files it lists (finishing a save killed during its renames first); ValueError naming
    the file that does not match. A config without checksums is returned as it is."""
    path = os.path.join(directory, config_name)
    meta = read_json(path)
    if not isinstance(meta, dict) or CHECKSUMS not in meta:
        return meta
    sums = meta[CHECKSUMS]
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise ValueError(f"{path}: field {CHECKSUMS!r} must map file names to hex digests")
    for name in sums:
        safe_member(directory, name, f"{path}: field {CHECKSUMS!r}")
    bad = _first_mismatch(directory, sums)
    if bad is None:
        return meta
    newer = _read_pending(directory, config_name)
    if newer is not None:
        try:
            _finish(directory, config_name, newer)
            return newer
        except OSError:
            pass  # a read-only folder: report the mismatch below
    raise ValueError(f"{bad} does not match the SHA-256 recorded in {path} (a torn or "
                     f"corrupted save); save again")


def recorded_sha256(meta: dict, name: str) -> Optional[str]:
    """The digest that a config read by read_verified_config records for file `name`, or
    None (a config without checksums)."""
    sums = meta.get(CHECKSUMS)
    return sums.get(name) if isinstance(sums, dict) else None


def move_changed_files(directory: str, write: Callable[[str], object],
                       remove_others: bool = False) -> list[str]:
    """Calls write(tmp_folder) (e.g. tokenizer.save_pretrained) on a temporary folder beside
    `directory`, then renames each file into `directory` whose bytes differ from the one
    there (each rename atomic). With `remove_others` (a folder that `write` owns whole) the
    files that this write did not produce are removed after, so an earlier save's files
    cannot outlive it (a model.safetensors beside new shards would load first). Returns the
    written files' names, relative."""
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=temporary_name("")[:-1] + "-",
                           suffix="-" + os.path.basename(directory))
    try:
        write(tmp)
        names = sorted(os.path.relpath(os.path.join(root, f), tmp)
                       for root, _, files in os.walk(tmp) for f in files)
        for name in names:
            src, dst = os.path.join(tmp, name), os.path.join(directory, name)
            if os.path.isfile(dst) and filecmp.cmp(src, dst, shallow=False):
                continue
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            fsync_path(src)
            os.replace(src, dst)
        os.makedirs(directory, exist_ok=True)
        if remove_others:
            keep = set(names)
            for root, _, files in os.walk(directory):
                for f in files:
                    if os.path.relpath(os.path.join(root, f), directory) not in keep:
                        os.remove(os.path.join(root, f))
        fsync_path(directory)
    finally:
        remove_path(tmp)
    return names
