"""Atomic writes: the target is either the old or the new content, temporaries of a killed
writer are removed by the next write, a failed write leaves nothing behind."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from moe_ext.utils.io import atomic_write, read_json, read_jsonl, sha256_file, write_json


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    write_json(str(path), {"v": 1})

    def broken(tmp):
        open(tmp, "w").write("{half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(str(path), broken)
    assert read_json(str(path)) == {"v": 1}
    assert os.listdir(tmp_path) == ["a.json"]


def test_killed_writer_leaves_the_old_file_and_the_next_write_cleans_up(tmp_path):
    path = tmp_path / "w.bin"
    write_json(str(path), {"v": "old"})
    script = textwrap.dedent(f"""
        import sys, time
        from moe_ext.utils.io import atomic_write
        def slow(tmp):
            with open(tmp, "w") as f:
                f.write("x" * 1000)
                f.flush()
                print("writing", flush=True)
                time.sleep(60)
        atomic_write({str(path)!r}, slow)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_json(str(path)) == {"v": "old"}
    assert len(os.listdir(tmp_path)) == 2  # the killed writer's temporary is still there
    write_json(str(path), {"v": "new"})
    assert os.listdir(tmp_path) == ["w.bin"] and read_json(str(path)) == {"v": "new"}


def test_jsonl_and_sha256(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert list(read_jsonl(str(path))) == [(1, {"a": 1}), (3, {"a": 2})]
    path.write_text('{"a": 1}\n{broken\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:2: not valid JSON"):
        list(read_jsonl(str(path)))
    assert sha256_file(str(path)) == __import__("hashlib").sha256(path.read_bytes()).hexdigest()


def test_written_files_follow_the_umask_not_owner_only(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(str(tmp_path / "a.json"), lambda p: open(p, "w").write("{}"))
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "a.json").st_mode & 0o777 == 0o644


def test_deeply_nested_json_and_rows_are_value_errors_naming_the_file(tmp_path):
    from moe_ext.data import load_preferences

    deep = "[" * 100_000 + "]" * 100_000
    for name in ("a.json", "rows.jsonl"):
        (tmp_path / name).write_text(deep + "\n")
    with pytest.raises(ValueError, match="a.json: JSON nested too deeply"):
        read_json(str(tmp_path / "a.json"))
    with pytest.raises(ValueError, match="rows.jsonl:1: JSON nested too deeply"):
        list(read_jsonl(str(tmp_path / "rows.jsonl")))
    with pytest.raises(ValueError, match="a.json: JSON nested too deeply"):
        load_preferences(str(tmp_path / "a.json"))
