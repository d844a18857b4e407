"""Saves in one step (moe_ext.utils.saved_folder): a save interrupted at each of its steps
reads back as the old or the new save (subfolders it owns included), the next save cleans
up (the libraries' own temporaries too), a corrupted file is named, configs without
checksums read as they are; files whose bytes did not change are not rewritten; the
folder lock makes a load wait for a save, with a bounded wait; read_jsonl refuses huge
lines."""
import json
import os
import threading

import pytest
import torch
from safetensors.torch import save_file

from moe_ext.utils import saved_folder
from moe_ext.utils.io import read_jsonl, sha256_file
from moe_ext.utils.locking import folder_lock
from moe_ext.utils.tensors import load_safetensors
from moe_ext.utils.saved_folder import commit_save, read_verified_config, replace_folder_files


def save(folder, value):
    """Save `value`: weights.bin and info.json hold it, and the owned subfolder sub/ holds
    one file named after it (so an old save's file there must go)."""
    files = {"weights.bin": lambda p: open(p, "w").write(f"weights {value}"),
             "info.json": lambda p: open(p, "w").write(json.dumps({"value": value}))}
    folders = {"sub": (lambda d: open(os.path.join(d, f"v{value}"), "w").write(str(value)), True)}
    commit_save(str(folder), "config.json", {"value": value}, files, folders)


def state(folder):
    """(config value, weights value, info value, sub/ values) as a load sees them."""
    with saved_folder.loading(str(folder)):
        meta = read_verified_config(str(folder), "config.json")
        weights = (folder / "weights.bin").read_text().split()[1]
        info = json.loads((folder / "info.json").read_text())["value"]
        sub = sorted(int((folder / "sub" / f).read_text()) for f in os.listdir(folder / "sub"))
    return meta["value"], int(weights), info, sub


def hidden(folder):
    return sorted(os.path.join(root, f) for root, dirs, files in os.walk(folder)
                  for f in files + dirs if f.startswith("."))


@pytest.mark.parametrize("fail_at", range(6))
def test_save_interrupted_at_each_rename_reads_old_or_new_and_next_save_cleans(
        tmp_path, monkeypatch, fail_at):
    save(tmp_path, 1)
    real_replace, calls = os.replace, []

    def replace(src, dst):  # renames: the staged config (write_json), the manifest, then
        calls.append(dst)   # info.json, sub/v2, weights.bin, the config over config.json
        if len(calls) > fail_at:
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(saved_folder.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2)
    monkeypatch.setattr(saved_folder.os, "replace", real_replace)
    # before a file is renamed: save 1; after: save 2, the load finishes the renames
    want = 1 if fail_at <= 2 else 2
    assert state(tmp_path) == (want, want, want, [want])
    save(tmp_path, 3)
    assert state(tmp_path) == (3, 3, 3, [3]) and hidden(tmp_path) == []


def test_save_interrupted_before_its_manifest_reads_old(tmp_path, monkeypatch):
    save(tmp_path, 1)
    monkeypatch.setattr(saved_folder, "write_json", lambda *a, **k: (_ for _ in ()).throw(
        KeyboardInterrupt("killed")))
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2)
    monkeypatch.undo()
    assert state(tmp_path) == (1, 1, 1, [1]) and hidden(tmp_path) == []
    save(tmp_path, 3)
    assert state(tmp_path) == (3, 3, 3, [3]) and hidden(tmp_path) == []


def test_killed_saves_staging_and_library_temporaries_go_with_the_next_save(tmp_path):
    """A save killed while a library wrote (safetensors' .tmpXXXXXX, owner-only) leaves
    them in its staging folder; the next save removes the folder whole."""
    save(tmp_path, 1)
    dead = tmp_path / ".pending-999999999-abc"
    (dead / "files").mkdir(parents=True)
    (dead / "files" / ".tmpA1b2C3").write_bytes(b"x" * 1000)
    save(tmp_path, 2)
    assert hidden(tmp_path) == [] and state(tmp_path) == (2, 2, 2, [2])


def test_saved_weights_follow_the_umask(tmp_path):
    """safetensors writes 0600 files; a saved folder's files follow the umask like its
    config."""
    old = os.umask(0o022)
    try:
        commit_save(str(tmp_path), "config.json", {},
                    {"w.safetensors": lambda p: save_file({"a": torch.ones(2)}, p)})
    finally:
        os.umask(old)
    for name in ("w.safetensors", "config.json"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o644, name


def start_stalled_save(tmp_path):
    """A thread saving value 2 that stalls while it writes its weights (still staging):
    returns (the thread, the Event that lets it go on)."""
    inside, done = threading.Event(), threading.Event()

    def slow(path):
        inside.set()
        assert done.wait(10)
        open(path, "w").write("weights 2")

    writer = threading.Thread(target=commit_save, args=(
        str(tmp_path), "config.json", {"value": 2},
        {"weights.bin": slow, "info.json": lambda p: open(p, "w").write('{"value": 2}')},
        {"sub": (lambda d: open(os.path.join(d, "v2"), "w").write("2"), True)}))
    writer.start()
    assert inside.wait(10)
    return writer, done


def test_loads_during_a_save_read_the_old_one_then_wait_for_its_renames(tmp_path, monkeypatch):
    """While a save stages its files a load reads the old save; while it holds the folder
    lock for its renames a load waits (here past MOE_EXT_LOCK_TIMEOUT: a TimeoutError
    naming the folder), then reads the new save."""
    save(tmp_path, 1)
    writer, done = start_stalled_save(tmp_path)
    assert state(tmp_path) == (1, 1, 1, [1])  # staging: the old save, no waiting
    done.set()
    writer.join()
    assert state(tmp_path) == (2, 2, 2, [2]) and hidden(tmp_path) == []

    held, release = threading.Event(), threading.Event()

    def renaming():  # what a save holds during its renames
        with folder_lock(str(tmp_path), exclusive=True):
            held.set()
            assert release.wait(10)

    holder = threading.Thread(target=renaming)
    holder.start()
    assert held.wait(10)
    monkeypatch.setenv("MOE_EXT_LOCK_TIMEOUT", "0.2")
    with pytest.raises(TimeoutError, match=str(tmp_path)):
        state(tmp_path)
    release.set()
    holder.join()
    assert state(tmp_path) == (2, 2, 2, [2])
    monkeypatch.setenv("MOE_EXT_LOCK_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="MOE_EXT_LOCK_TIMEOUT"):
        state(tmp_path)


def test_a_save_leaves_the_staging_folder_of_a_save_still_staging(tmp_path):
    """Two saves at once: the one that renames first must not remove the other's staging
    folder (it holds that folder's lock while staging), and the last to rename wins whole."""
    save(tmp_path, 1)
    writer, done = start_stalled_save(tmp_path)
    save(tmp_path, 3)
    assert state(tmp_path) == (3, 3, 3, [3]) and len(hidden(tmp_path)) > 0
    done.set()
    writer.join()
    assert state(tmp_path) == (2, 2, 2, [2]) and hidden(tmp_path) == []


def test_corrupted_file_is_named_and_unchecked_config_reads_as_is(tmp_path):
    save(tmp_path, 1)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["sha256"]["weights.bin"] == sha256_file(str(tmp_path / "weights.bin"))
    (tmp_path / "weights.bin").write_text("weights 9")
    with pytest.raises(ValueError, match="weights.bin does not match the SHA-256"):
        read_verified_config(str(tmp_path), "config.json")
    (tmp_path / "config.json").write_text(json.dumps({"value": 1}))  # e.g. PEFT's
    assert read_verified_config(str(tmp_path), "config.json") == {"value": 1}


def test_replace_folder_files_rewrites_only_changed_files(tmp_path):
    def write(contents):
        return lambda tmp: [open(os.path.join(tmp, k), "w").write(v) for k, v in contents.items()]

    target = tmp_path / "tok"
    replace_folder_files(str(target), write({"a": "1", "b": "2"}))
    inode = os.stat(target / "a").st_ino
    replace_folder_files(str(target), write({"a": "1", "b": "3"}))
    assert os.stat(target / "a").st_ino == inode  # same bytes: not replaced
    assert (target / "b").read_text() == "3"
    assert sorted(os.listdir(tmp_path)) == ["tok"]
    replace_folder_files(str(target), write({"b": "3", "c": "4"}))  # a is an earlier save's
    assert sorted(os.listdir(target)) == ["b", "c"]


def test_read_jsonl_refuses_a_huge_line_naming_it(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n' + '{"a": "' + "x" * 5000 + '"}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:2: line longer than 1000 bytes"):
        list(read_jsonl(str(path), max_line_bytes=1000))
    assert list(read_jsonl(str(path), max_line_bytes=6000))[0] == (1, {"a": 1})


def test_weights_linked_from_elsewhere_load_and_names_cannot_leave(tmp_path):
    """Hugging Face's cache links snapshot files to blobs outside the folder: followed; a
    name with ".." or an absolute name is refused."""
    blobs, folder = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    folder.mkdir()
    (blobs / "w").write_text("weights")
    os.symlink(blobs / "w", folder / "weights.bin")
    assert open(saved_folder.safe_member(str(folder), "weights.bin", "cfg")).read() == "weights"
    for name in ("../blobs/w", str(blobs / "w"), "a/../../x", "."):
        with pytest.raises(ValueError, match="cfg"):
            saved_folder.safe_member(str(folder), name, "cfg")


def test_tensors_are_checked_against_the_digest_on_the_bytes_read(tmp_path):
    """A load reads the weights once and checks those bytes: a file replaced after its
    config was verified (a save during the load) is an error naming it, never a mix."""
    path = str(tmp_path / "w.safetensors")
    save_file({"a": torch.ones(2)}, path)
    assert torch.equal(load_safetensors(path, sha256_file(path))["a"], torch.ones(2))
    assert torch.equal(load_safetensors(path)["a"], torch.ones(2))  # no checksum recorded
    with pytest.raises(ValueError, match="w.safetensors does not match"):
        load_safetensors(path, "0" * 64)
