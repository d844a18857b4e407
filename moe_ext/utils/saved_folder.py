"""Saving a folder of weights and config as one step, and loading it back verified, with
several writers and readers at once and writers killed at any point.

commit_save:
  1. writes every file of the save (weights, small JSON files, whole subfolders such as a
     backbone's save_pretrained or a tokenizer) into a staging folder of its own,
     .pending-<pid>-<random>/, on which it holds an exclusive flock while it writes (so
     other saves know it is alive), and where the libraries' own temporaries land too;
     flushes them to disk and computes each file's SHA-256 there, on the bytes it wrote;
  2. writes the new config, which records those digests ("sha256"), and a manifest, into
     the staging folder;
  3. takes the folder's exclusive lock (locking.py), finishes or discards what killed
     saves left (see below), renames each file whose bytes changed into place, removes
     the files of the folders it owns whole that the new save did not write (a
     model.safetensors beside new shards would load first), renames the config into place
     last, removes its staging folder and drops the lock.
Loads (loading()) hold the shared lock while they read the config and the files it names,
so they see one whole save, and check the digests. A process killed before step 3 leaves
the old save intact; one killed during step 3 leaves a staging folder whose manifest says
where every file of the new save is (staged, or already in place) and whose lock nobody
holds any more: the next save, or the next load when no one holds the folder, finishes
those renames, so every load sees the old or the new save. Where the platform has no lock
(see locking.py), two saves can still interleave their renames; the digests then make the
load fail with a clear error instead of mixing two saves. A config without "sha256"
(PEFT's, older moe_ext versions') loads as it is.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from typing import Callable, Iterator, Optional

from .io import pid_alive, fsync_path, read_json, remove_path, sha256_file, umask_mode, write_json
from .locking import folder_lock, release, try_exclusive

STAGING = ".pending-"                     # staging folders: .pending-<pid>-<random>
_STAGING_NAME = re.compile(r"\.pending-(\d+)-.+")
MANIFEST = "manifest.json"                # in a staging folder, beside TREE
TREE = "files"                            # in a staging folder: the files, as laid out in the folder
CHECKSUMS = "sha256"  # the config's key: {file name (relative to the folder): hex digest}

Writer = Callable[[str], object]


def _first_mismatch(directory: str, sums: dict) -> Optional[str]:
    """The first file whose checksum differs from `sums` (or that is missing)."""
    for name, digest in sums.items():
        path = os.path.join(directory, name)
        if not (os.path.isfile(path) and sha256_file(path) == digest):
            return path
    return None


def _staging_folders(directory: str) -> list[str]:
    try:
        entries = os.listdir(directory)
    except OSError:
        return []
    return sorted(os.path.join(directory, e) for e in entries
                  if e.startswith(STAGING) and os.path.isdir(os.path.join(directory, e)))


def _files_under(folder: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(root, f), folder)
                  for root, _, files in os.walk(folder) for f in files)


def _read_manifest(stage: str, directory: str) -> Optional[dict]:
    """The manifest of a staging folder if the save it holds is complete (every file staged
    or already renamed into place with its digest, the config staged or in place), else
    None."""
    try:
        manifest = read_json(os.path.join(stage, MANIFEST))
        files, config = manifest["files"], manifest["config"]
        owned, config_sum = manifest["owned"], manifest["config_sha256"]
        if not (isinstance(files, dict) and isinstance(config, str) and isinstance(owned, list)
                and isinstance(config_sum, str)):
            return None
        for name in list(files) + [config] + owned:
            safe_member(directory, name, stage)
    except (ValueError, OSError, KeyError, TypeError):
        return None
    tree = os.path.join(stage, TREE)
    for name, digest in [*files.items(), (config, config_sum)]:
        staged, final = os.path.join(tree, name), os.path.join(directory, name)
        if not any(os.path.isfile(p) and sha256_file(p) == digest for p in (staged, final)):
            return None
    return manifest


def _finish(directory: str, stage: str, manifest: dict) -> None:
    """Step 4 of a complete staged save (also run again on one killed during it)."""
    tree, touched = os.path.join(stage, TREE), {directory}
    for name, digest in manifest["files"].items():
        src, dst = os.path.join(tree, name), os.path.join(directory, name)
        if not os.path.isfile(src):
            continue  # renamed into place before a kill
        if os.path.isfile(dst) and sha256_file(dst) == digest:
            continue  # the same bytes: leave the file alone (a frozen backbone saved again)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.replace(src, dst)
        touched.add(os.path.dirname(dst))
    keep = set(manifest["files"])
    for sub in manifest["owned"]:
        for name in _files_under(os.path.join(directory, sub)):
            if os.path.join(sub, name) not in keep:
                os.remove(os.path.join(directory, sub, name))
                touched.add(os.path.dirname(os.path.join(directory, sub, name)))
    for folder in touched:
        fsync_path(folder)
    config = os.path.join(tree, manifest["config"])
    if os.path.isfile(config):
        os.replace(config, os.path.join(directory, manifest["config"]))
    fsync_path(directory)
    remove_path(stage)


def _config_matches(directory: str, config_name: str) -> bool:
    try:
        meta = read_json(os.path.join(directory, config_name))
    except (ValueError, OSError):
        return False
    sums = meta.get(CHECKSUMS) if isinstance(meta, dict) else None
    if not isinstance(sums, dict):
        return True
    try:
        return _first_mismatch(directory, sums) is None
    except (TypeError, OSError):
        return False


def _abandoned(stage: str) -> bool:
    """Whether the save that made a staging folder is gone: a live save holds the
    folder's own exclusive lock while it stages; where there is no flock, whether the
    process whose pid is in the name is gone."""
    fd, supported = try_exclusive(stage)
    if fd is not None:
        release(fd)
        return True
    if supported:
        return False
    match = _STAGING_NAME.fullmatch(os.path.basename(stage))
    return match is not None and not pid_alive(int(match.group(1)))


def _recover(directory: str, config_name: str) -> None:
    """What killed saves left (call with the folder's exclusive lock held): when the
    folder's config does not match its files (a save killed during its renames), the
    newest complete abandoned staged save is finished; then the abandoned staging folders
    are removed (those of saves still staging are left to them)."""
    stages = [s for s in _staging_folders(directory) if _abandoned(s)]
    if not stages:
        return
    if not _config_matches(directory, config_name):
        for stage in sorted(stages, key=os.path.getmtime, reverse=True):
            manifest = _read_manifest(stage, directory)
            if manifest is not None and manifest["config"] == config_name:
                _finish(directory, stage, manifest)
                break
    for stage in stages:
        remove_path(stage)


def _stage_write(tree: str, name: str, write: Writer) -> None:
    path = os.path.join(tree, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write(path)


def commit_save(directory: str, config_name: str, meta: dict,
                files: Optional[dict[str, Writer]] = None,
                folders: Optional[dict[str, tuple[Writer, bool]]] = None,
                checksums: bool = True) -> None:
    """Writes a save in one step (see the module docstring).

    files: {name: write(path)} for files of the folder itself (write(path) creates the
      file at `path`).
    folders: {subfolder: (write(folder), owned)}: write(folder) fills a folder (e.g. a
      tokenizer's save_pretrained) whose files land in `subfolder` ("" for the folder
      itself); owned: the subfolder belongs to the save whole, so its files that this
      save did not write are removed.
    checksums: the config records every file's SHA-256 under "sha256" (False: `meta` is
      written as it is, e.g. PEFT's own config; the save is still one step).
    ValueError when two writers name the same file or a name leaves the folder."""
    os.makedirs(directory, exist_ok=True)
    stage = tempfile.mkdtemp(dir=directory, prefix=f"{STAGING}{os.getpid()}-")
    own, _ = try_exclusive(stage)  # held while staging: other saves leave this folder alone
    try:
        _stage(directory, stage, config_name, meta, files or {}, folders or {}, checksums)
        with folder_lock(directory, exclusive=True):  # the renames, one save at a time
            _recover(directory, config_name)
            _finish(directory, stage, read_json(os.path.join(stage, MANIFEST)))
    except BaseException:
        if not os.path.isfile(os.path.join(stage, MANIFEST)):
            remove_path(stage)  # once its renames may have begun, the next save or load finishes them
        raise
    finally:
        if own is not None:
            release(own)


def _stage(directory: str, stage: str, config_name: str, meta: dict,
           files: dict[str, Writer], folders: dict[str, tuple[Writer, bool]],
           checksums: bool) -> None:
    """Steps 2 and 3: the files, their digests, the config and the manifest, in `stage`."""
    tree = os.path.join(stage, TREE)
    os.makedirs(tree)
    for sub, (write, _) in folders.items():
        if sub:
            safe_member(directory, sub, "folders")
        target = os.path.join(tree, sub)
        os.makedirs(target, exist_ok=True)
        write(target)
    for name, write in files.items():
        safe_member(directory, name, "files")
        if os.path.exists(os.path.join(tree, name)):
            raise ValueError(f"commit_save: {name!r} is written twice")
        _stage_write(tree, name, write)
    names = _files_under(tree)
    if config_name in names:
        raise ValueError(f"commit_save: a file of the save is named like the config {config_name!r}")
    mode = umask_mode()
    sums = {}
    for name in names:  # the bytes this writer wrote, in its own folder
        path = os.path.join(tree, name)
        os.chmod(path, mode)  # the libraries write owner-only temporaries; a save follows the umask
        fsync_path(path)
        sums[name] = sha256_file(path)
    config = {**meta, CHECKSUMS: sums} if checksums else dict(meta)
    config_path = os.path.join(tree, config_name)
    write_json(config_path, config)
    owned = [sub for sub, (_, own) in folders.items() if own and sub]
    write_json(os.path.join(stage, MANIFEST), {"config": config_name, "files": sums,
                                               "owned": owned,
                                               "config_sha256": sha256_file(config_path)})
    for folder in {os.path.dirname(os.path.join(tree, n)) for n in names} | {tree, stage}:
        fsync_path(folder)


@contextlib.contextmanager
def loading(directory: str) -> Iterator[None]:
    """Holds the shared lock on `directory` while a load reads it (a save waits, and a load
    waits for a save in progress); first, when no one holds the folder, finishes a save
    that was killed during its renames (if the folder is writable)."""
    if _staging_folders(directory):
        fd, _ = try_exclusive(directory)
        if fd is not None:
            try:
                for name in {m.get("config") for m in _manifests(directory)}:
                    _recover(directory, name)
            except OSError:
                pass  # a read-only folder: the load reports what it finds
            finally:
                release(fd)
    if not os.path.isdir(directory):
        yield
        return
    with folder_lock(directory, exclusive=False):
        yield


def _manifests(directory: str) -> list[dict]:
    found = []
    for stage in _staging_folders(directory):
        try:
            manifest = read_json(os.path.join(stage, MANIFEST))
        except (ValueError, OSError):
            manifest = None
        found.append(manifest if isinstance(manifest, dict) and
                     isinstance(manifest.get("config"), str) else {"config": ""})
    return found


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
    files it lists (under the folder's shared lock, after finishing a save killed during
    its renames); ValueError naming the file that does not match. A config without
    checksums is returned as it is. Callers that read the files after this hold
    loading(directory) around both, so that they read the same save."""
    with loading(directory):
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
        if bad is not None:
            raise ValueError(f"{bad} does not match the SHA-256 recorded in {path} (a torn or "
                             f"corrupted save, or two saves at once where the file system has "
                             f"no locks); save again")
        return meta


def recorded_sha256(meta: dict, name: str) -> Optional[str]:
    """The digest that a config read by read_verified_config records for file `name`, or
    None (a config without checksums)."""
    sums = meta.get(CHECKSUMS)
    return sums.get(name) if isinstance(sums, dict) else None


def replace_folder_files(directory: str, write: Writer) -> list[str]:
    """A folder without a config of its own (the base model a train-pmol output keeps
    beside its adapter): write(tmp) fills a staging folder inside `directory`, then each
    file whose bytes differ is renamed into place and the files this write did not
    produce are removed, all under the folder's exclusive lock; returns the files'
    names, relative. A kill leaves every file whole (old or new bytes), not the folder."""
    os.makedirs(directory, exist_ok=True)
    with folder_lock(directory, exclusive=True):
        for stage in _staging_folders(directory):
            if _abandoned(stage):
                remove_path(stage)
        stage = tempfile.mkdtemp(dir=directory, prefix=f"{STAGING}{os.getpid()}-")
        try:
            write(stage)
            names = _files_under(stage)
            mode = umask_mode()
            for name in names:
                os.chmod(os.path.join(stage, name), mode)
                fsync_path(os.path.join(stage, name))
            for name in names:
                src, dst = os.path.join(stage, name), os.path.join(directory, name)
                if os.path.isfile(dst) and sha256_file(dst) == sha256_file(src):
                    continue
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                os.replace(src, dst)
            keep = set(names)
            for name in _files_under(directory):
                if name not in keep and not name.startswith(STAGING):
                    os.remove(os.path.join(directory, name))
            fsync_path(directory)
        finally:
            remove_path(stage)
        return names


