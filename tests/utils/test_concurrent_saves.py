"""Several writers and a reader on one folder, writers SIGKILLed at random (the repeatable
part of the fault campaign of issue 30): 3 processes save a MoLoRA adapter (or a reward
model with its train_info.json) to one folder in a loop, each save holding one value in
all its weights and its config, while a reader loads it over and over and a random
writer is killed every 25 loads. Every load must be one whole save (no mix of two), and
none may fail. MOE_EXT_CONCURRENCY_LOADS sets the loads per artefact (default 300: about
10 s each on 2 cores; the campaign ran 3,000)."""
import json
import os
import subprocess
import sys

import pytest

LOADS = int(os.environ.get("MOE_EXT_CONCURRENCY_LOADS", "300"))
WORKER = os.path.join(os.path.dirname(__file__), "concurrent_worker.py")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the worker forks its writers")
@pytest.mark.parametrize("kind", ["adapter", "reward"])
def test_three_writers_one_reader_and_kills_give_whole_saves(tmp_path, kind):
    out = subprocess.run([sys.executable, WORKER, kind, str(tmp_path / kind), str(LOADS), "3",
                          "25", "0"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{kind}: {result}")
    assert result["loads"] == LOADS and result["kills"] == LOADS // 25
    assert result["mixed"] == 0 and result["errors"] == [], result["errors"]
    assert result["saves_seen"] > 3  # the writers did overtake the reader
