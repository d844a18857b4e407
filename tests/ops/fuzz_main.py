"""The op fuzzer's entry points, run as a subprocess so that a crash ends that process and
not the test runner:

  python tests/ops/fuzz_main.py hypothesis --examples 150 [--device cpu] [--family lora ...]
      Hypothesis draws the cases (and shrinks a failing one); prints one JSON line with the
      cases run per family and how many ended in a result or an error. tests/ops/test_fuzz.py
      runs this, also under the sanitizer build (make test-asan).
  python tests/ops/fuzz_main.py worker --family lora --seed 0 --start 0 --stop 2500
      Cases from random.Random(f"{seed}-{family}-{i}") one by one, printing "CASE i ..." before
      and "DONE i <outcome>" after each, for experiments/fuzz_campaign.py, which restarts
      the worker after a crash and counts the crashes.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys

import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import moe_ext  # noqa: F401  (loads the ops)

from fuzz_cases import FAMILIES, make_case
from fuzz_check import FuzzFailure, run_case


def limit_memory(gib: int = 8) -> None:
    """A bad size must end in an error, not in swapping the shared machine to death: cap the
    heap (RLIMIT_DATA), except under AddressSanitizer, whose shadow memory needs more (it gets
    ASAN_OPTIONS=max_allocation_size_mb instead)."""
    if "libasan" in os.environ.get("LD_PRELOAD", ""):
        return
    resource.setrlimit(resource.RLIMIT_DATA, (gib << 30, gib << 30))


def hypothesis_main(families, examples: int, device: str) -> dict:
    summary = {}
    for family in families:
        counts = summary.setdefault(family, {"cases": 0, "result": 0, "error": 0})

        @settings(max_examples=examples, deadline=None, database=None, print_blob=True,
                  suppress_health_check=list(HealthCheck))
        @given(rng=st.randoms(use_true_random=False))
        def fuzz(rng):
            outcome = run_case(make_case(family, rng), device)
            counts["cases"] += 1
            counts[outcome] += 1

        fuzz()
    return summary


def worker_main(family: str, seed: int, start: int, stop: int, device: str) -> None:
    for i in range(start, stop):
        case = make_case(family, random.Random(f"{seed}-{family}-{i}"))
        print(f"CASE {i} {case.describe()}", flush=True)
        try:
            outcome = run_case(case, device)
        except FuzzFailure as e:
            outcome = "FAIL " + " ".join(str(e).split())[:400]
        print(f"DONE {i} {outcome}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["hypothesis", "worker"])
    parser.add_argument("--family", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--examples", type=int, default=150, help="hypothesis: cases per family")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (run with MOE_EXT_DEBUG=1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--stop", type=int, default=100)
    args = parser.parse_args(argv)
    limit_memory()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.mode == "hypothesis":
        print(json.dumps(hypothesis_main(args.family, args.examples, args.device)), flush=True)
    else:
        worker_main(args.family[0], args.seed, args.start, args.stop, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
