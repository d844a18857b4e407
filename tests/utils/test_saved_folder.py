"""Saves in one step (moe_ext.utils.saved_folder): a save interrupted at each of its steps
reads back as the old or the new save, the next save cleans up, a corrupted file is named,
configs without checksums read as they are; files whose bytes did not change are not
rewritten; read_jsonl refuses huge lines."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from moe_ext.utils import saved_folder
from moe_ext.utils.io import read_jsonl, sha256_file
from moe_ext.utils.tensors import load_safetensors
from moe_ext.utils.saved_folder import (begin_save, commit_save, move_changed_files,
                                        read_verified_config)


def save(folder, value, extra=None):
    begin_save(str(folder), "config.json")
    files = {"weights.bin": lambda p: open(p, "w").write(f"weights {value}"),
             "info.json": lambda p: open(p, "w").write(json.dumps({"value": value}))}
    commit_save(str(folder), "config.json", {"value": value}, files)


def state(folder):
    """(config value, weights value, info value) as a load sees them."""
    meta = read_verified_config(str(folder), "config.json")
    weights = (folder / "weights.bin").read_text().split()[1]
    info = json.loads((folder / "info.json").read_text())["value"]
    return meta["value"], int(weights), info


def hidden(folder):
    return sorted(f for f in os.listdir(folder) if f.startswith("."))


@pytest.mark.parametrize("fail_at", range(4))
def test_save_interrupted_at_each_rename_reads_old_or_new_and_next_save_cleans(
        tmp_path, monkeypatch, fail_at):
    save(tmp_path, 1)
    real_replace, calls = os.replace, []

    def replace(src, dst):  # renames: the pending config's temporary (write_json),
        calls.append(dst)   # weights.bin, info.json, the pending config over config.json
        if len(calls) > fail_at:
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(saved_folder.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2)
    monkeypatch.setattr(saved_folder.os, "replace", real_replace)
    # before a file is renamed: save 1; after: save 2, the load finishes the renames
    want = 1 if fail_at <= 1 else 2
    assert state(tmp_path) == (want, want, want)
    save(tmp_path, 3)
    assert state(tmp_path) == (3, 3, 3) and hidden(tmp_path) == []


def test_save_interrupted_before_its_pending_config_reads_old(tmp_path, monkeypatch):
    save(tmp_path, 1)
    monkeypatch.setattr(saved_folder, "write_json", lambda *a, **k: (_ for _ in ()).throw(
        KeyboardInterrupt("killed")))
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2)
    monkeypatch.undo()
    assert state(tmp_path) == (1, 1, 1)
    save(tmp_path, 3)
    assert state(tmp_path) == (3, 3, 3) and hidden(tmp_path) == []


def test_corrupted_file_is_named_and_unchecked_config_reads_as_is(tmp_path):
    save(tmp_path, 1)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["sha256"]["weights.bin"] == sha256_file(str(tmp_path / "weights.bin"))
    (tmp_path / "weights.bin").write_text("weights 9")
    with pytest.raises(ValueError, match="weights.bin does not match the SHA-256"):
        read_verified_config(str(tmp_path), "config.json")
    (tmp_path / "config.json").write_text(json.dumps({"value": 1}))  # e.g. PEFT's
    assert read_verified_config(str(tmp_path), "config.json") == {"value": 1}


def test_move_changed_files_rewrites_only_changed_files(tmp_path):
    def write(contents):
        return lambda tmp: [open(os.path.join(tmp, k), "w").write(v) for k, v in contents.items()]

    target = tmp_path / "tok"
    move_changed_files(str(target), write({"a": "1", "b": "2"}))
    inode = os.stat(target / "a").st_ino
    move_changed_files(str(target), write({"a": "1", "b": "3"}))
    assert os.stat(target / "a").st_ino == inode  # same bytes: not replaced
    assert (target / "b").read_text() == "3"
    assert sorted(os.listdir(tmp_path)) == ["tok"]
    move_changed_files(str(target), write({"b": "3", "c": "4"}))  # a is an earlier save's
    assert sorted(os.listdir(target)) == ["a", "b", "c"]
    move_changed_files(str(target), write({"b": "3", "c": "4"}), remove_others=True)
    assert sorted(os.listdir(target)) == ["b", "c"]


def test_read_jsonl_refuses_a_huge_line_naming_it(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n' + '{"a": "' + "x" * 5000 + '"}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:2: line longer than 1000 bytes"):
        list(read_jsonl(str(path), max_line_bytes=1000))
    assert list(read_jsonl(str(path), max_line_bytes=6000))[0] == (1, {"a": 1})


def test_a_reader_finishing_a_save_does_not_fail_its_writer(tmp_path):
    """A load during a save's renames finishes them (read_verified_config); the writer's own
    renames of what is already in place are then no error."""
    save(tmp_path, 1)
    begin_save(str(tmp_path), "config.json")
    new = {"value": 2, saved_folder.CHECKSUMS: {}}
    for name, text in (("weights.bin", "weights 2"), ("info.json", json.dumps({"value": 2}))):
        pending = tmp_path / (saved_folder.PENDING + name)
        pending.write_text(text)
        new[saved_folder.CHECKSUMS][name] = sha256_file(str(pending))
    (tmp_path / (saved_folder.PENDING + "config.json")).write_text(json.dumps(new))
    saved_folder._finish(str(tmp_path), "config.json", new)  # the reader
    saved_folder._finish(str(tmp_path), "config.json", new)  # the writer, after it
    assert state(tmp_path) == (2, 2, 2) and hidden(tmp_path) == []


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
