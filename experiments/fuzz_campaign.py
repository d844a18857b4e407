"""Crash campaign over direct torch.ops.moe_ext calls with mutated inputs (the cases of
tests/ops/fuzz_cases.py), counting per op family the cases that end in a result, a clear
error, a wrong outcome, or a crash (signal, sanitizer report, hang), with each crash's first
sanitizer line and source frame.

    make asan-build   # the CPU kernels under AddressSanitizer + UBSan, in build/asan
    .venv/bin/python experiments/fuzz_campaign.py --asan --cases 1000 --label after

A worker process (tests/ops/fuzz_main.py worker) runs the cases in order; when it dies the
campaign records the case it was in and starts a new worker after it. Results are merged by
label into experiments/results/fuzz_campaign.json and .md, with the run's facts.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import time

from moe_ext.utils.facts import run_facts
from moe_ext.utils.io import read_json, write_json, write_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "ops", "fuzz_main.py")
FAMILIES = ("route", "align", "lora", "lora_dense")
SANITIZER_LINE = re.compile(r"(ERROR: AddressSanitizer: [\w-]+|runtime error: [^\n]{0,80}|"
                            r"AddressSanitizer: [\w-]+|LeakSanitizer|RSS limit|out of memory)")
FRAME = re.compile(r"(csrc/[\w/]+\.(?:cpp|h):\d+)")


def asan_env() -> dict:
    """The environment that loads the sanitizer build (see the Makefile's test-asan)."""
    libs = glob.glob(os.path.join(ROOT, "build", "asan", "lib", "moe_ext", "_C*.so"))
    if not libs:
        sys.exit("no sanitizer build: run `make asan-build` first")
    runtime = [subprocess.run(["g++", f"-print-file-name={lib}"], capture_output=True,
                              text=True).stdout.strip() for lib in ("libasan.so", "libstdc++.so")]
    return {"MOE_EXT_EXTENSION": libs[0], "LD_PRELOAD": " ".join(runtime),
            "ASAN_OPTIONS": "detect_leaks=0:allocator_may_return_null=1:"
                            "max_allocation_size_mb=4096:hard_rss_limit_mb=6144",
            "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}


def crash_kind(returncode: int, stderr: str) -> tuple[str, str]:
    """(kind, where): the sanitizer's first report line or the signal, and a csrc frame."""
    found = SANITIZER_LINE.search(stderr)
    frame = FRAME.search(stderr)
    if found:
        kind = found.group(1)
        kind = re.sub(r"runtime error: (signed integer overflow).*", r"ubsan: \1", kind)
        kind = re.sub(r"ERROR: AddressSanitizer: ", "asan: ", kind)
    elif returncode < 0:
        kind = f"signal {-returncode}"
    else:
        kind = f"exit {returncode}"
    return kind, frame.group(1) if frame else ""


def run_family(family: str, cases: int, seed: int, env: dict, timeout: float) -> dict:
    stats = {"cases": 0, "result": 0, "error": 0, "wrong": 0, "crash": 0, "crashes": [],
             "wrong_examples": []}
    start = 0
    while start < cases:
        proc = subprocess.Popen([sys.executable, WORKER, "worker", "--family", family,
                                 "--seed", str(seed), "--start", str(start), "--stop", str(cases)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **env})
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err += "\nRSS limit or hang: timed out"
        current, last_done = None, start - 1
        for line in out.splitlines():
            if line.startswith("CASE "):
                current = line
            elif line.startswith("DONE "):
                _, i, outcome = line.split(" ", 2)
                last_done = int(i)
                stats["cases"] += 1
                key = "wrong" if outcome.startswith("FAIL") else outcome
                stats[key] += 1
                if key == "wrong" and len(stats["wrong_examples"]) < 20:
                    stats["wrong_examples"].append(outcome[5:300])
        if proc.returncode == 0 and last_done == cases - 1:
            break
        kind, where = crash_kind(proc.returncode, err)
        stats["cases"] += 1
        stats["crash"] += 1
        stats["crashes"].append({"case": (current or "")[:300], "kind": kind, "where": where})
        print(f"  {family}: crash in {(current or '?')[:120]} -> {kind} {where}", flush=True)
        start = last_done + 2  # past the case that crashed
    return stats


def markdown(results: dict) -> str:
    lines = ["# Fuzz campaign over direct torch.ops.moe_ext calls", "",
             "Cases from tests/ops/fuzz_cases.py (valid inputs, then up to three mutations of "
             "shapes, dtypes, devices incl. meta, ids, order/offsets, sizes, scaling, "
             "temperature, logits); run by experiments/fuzz_campaign.py. \"wrong\": a result "
             "that differs from the float64 reference, an error that names no argument, or "
             "valid input refused / invalid input accepted. \"crash\": the process died "
             "(signal or sanitizer report).", ""]
    for label, run in results.items():
        facts = run["facts"]
        lines += [f"## {label}", "",
                  f"{facts['date']}, commit {facts['commit']}, {facts['cpu']} ({facts['cores']} "
                  f"cores), torch {facts['torch']}, build: {run['build']}, {run['seconds']:.0f} s", "",
                  *([run["note"], ""] if run.get("note") else []),
                  "| family | cases | result | clear error | wrong | crash |",
                  "|---|---|---|---|---|---|"]
        for family, s in run["families"].items():
            lines.append(f"| {family} | {s['cases']} | {s['result']} | {s['error']} | "
                         f"{s['wrong']} | {s['crash']} |")
        kinds: dict = {}
        for s in run["families"].values():
            for c in s["crashes"]:
                key = f"{c['kind']} {c['where']}".strip()
                kinds[key] = kinds.get(key, 0) + 1
        if kinds:
            lines += ["", "Crashes by kind:", ""] + [f"- {n} x {k}" for k, n in
                                                     sorted(kinds.items(), key=lambda kv: -kv[1])]
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000, help="cases per op family")
    parser.add_argument("--family", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--asan", action="store_true", help="run the sanitizer build")
    parser.add_argument("--label", default="after", help="name of this run in the results")
    parser.add_argument("--note", default="", help="a sentence shown with this run's results")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per worker")
    parser.add_argument("--output", default=os.path.join(ROOT, "experiments", "results",
                                                         "fuzz_campaign"))
    args = parser.parse_args()
    env = asan_env() if args.asan else {}
    began = time.time()
    families = {}
    for family in args.family:
        families[family] = run_family(family, args.cases, args.seed, env, args.timeout)
        print(family, {k: v for k, v in families[family].items() if not isinstance(v, list)},
              flush=True)
    path = args.output + ".json"
    results = read_json(path) if os.path.exists(path) else {}
    results[args.label] = {"facts": run_facts(ROOT), "build": "ASan+UBSan CPU" if args.asan
                           else "release", "seconds": time.time() - began, "families": families,
                           "note": args.note}
    write_json(path, results)
    write_text(args.output + ".md", markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
