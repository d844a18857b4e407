"""Fuzzing of direct torch.ops.moe_ext calls with mutated inputs (fuzz_cases.py: shapes,
dtypes, devices incl. meta, negative / huge ids, bad order / offsets, huge num_bins and
num_null_experts, non-finite scaling, logits and temperature). Every call must return the
float64 reference's result or raise ValueError / RuntimeError naming an argument
(fuzz_check.py). The fuzzer runs in a subprocess, so that a crash fails this test instead of
killing the runner; `make test-asan` runs it on the sanitizer build."""
import json
import os
import subprocess
import sys

import pytest
import torch

import fuzz_check
from fuzz_cases import Case
from fuzz_check import FuzzFailure, run_case

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = int(os.environ.get("MOE_EXT_FUZZ_EXAMPLES", "250"))  # per op family
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
def test_fuzz_direct_op_calls(device):
    # On CUDA the data checks need the debug switch (they cost a host sync).
    env = dict(os.environ, MOE_EXT_DEBUG="1") if device == "cuda" else dict(os.environ)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "fuzz_main.py"), "hypothesis",
                           "--examples", str(EXAMPLES), "--device", device],
                          capture_output=True, text=True, env=env, timeout=1800)
    how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
    assert proc.returncode == 0, f"fuzzer {how}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(summary) == {"route", "align", "lora", "lora_dense"}
    for family, counts in summary.items():
        assert counts["cases"] >= EXAMPLES // 2, (family, counts)
        # both outcomes are exercised: valid calls return, mutated ones are refused
        assert counts["result"] > 0 and counts["error"] > 0, (family, counts)


def test_judge_flags_accepted_invalid_input_and_refused_valid_input():
    experts = torch.tensor([[0, 1], [2, 0]])
    with pytest.raises(FuzzFailure, match="invalid inputs accepted"):
        run_case(Case("align", [experts, 3], expect="invalid"))
    with pytest.raises(FuzzFailure, match="valid inputs refused"):
        run_case(Case("align", [experts, 2], expect="valid"))  # id 2 is outside [0, 2)
    assert run_case(Case("align", [experts, 3])) == "result"
    assert run_case(Case("align", [experts, 2], expect="invalid")) == "error"


def test_judge_flags_results_that_differ_from_the_reference(monkeypatch):
    def off_by_one(experts, num_bins):
        order, offsets = torch.ops.moe_ext.align(experts, num_bins)
        return (order, offsets + 1)

    monkeypatch.setitem(fuzz_check.REFERENCES, "align", off_by_one)
    with pytest.raises(FuzzFailure, match="differs from the reference"):
        run_case(Case("align", [torch.tensor([[0, 1]]), 2]))
