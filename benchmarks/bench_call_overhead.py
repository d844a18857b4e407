"""Host time per op call, two builds of moe_ext._C side by side (CPU).

The stable-ABI build calls aten ops through the dispatcher by name and reads tensor facts
through a C shim: this measures what that costs per call at tiny sizes (where the host code
is all there is), and that large sizes do not move. Each build runs in its own process
(MOE_EXT_EXTENSION loads a given _C), the two alternating round by round so that they share
the machine's noise; the report gives per-case medians over rounds and the ratio after/before.

    # an earlier build to compare with, e.g. the commit before the stable ABI:
    git worktree add /tmp/before <commit> && (cd /tmp/before && MOE_EXT_CUDA=0 \\
        python setup.py -q build_ext --inplace)
    python benchmarks/bench_call_overhead.py --before /tmp/before/moe_ext/_C*.so --rounds 7
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def tiny_cases(torch):
    """Direct op calls at the smallest sizes: T=2 tokens, D=O=16, E=8, K=2, R=4 (fp32)."""
    ops = torch.ops.moe_ext
    g = torch.Generator().manual_seed(0)
    T, D, O, E, K, R = 2, 16, 16, 8, 2, 4
    x, dy = torch.randn(T, D, generator=g), torch.randn(T, O, generator=g)
    A, B = torch.randn(E, R, D, generator=g), torch.randn(E, O, R, generator=g)
    probs, w, e, _ = ops.route(torch.randn(T, E, generator=g), None, K, 1.0, True)
    y, h, order, offsets = ops.lora_forward(x, A, B, w, e, 1.0, 0)
    _, h_all = ops.lora_dense_forward(x, A, B, w, e, 1.0, 0)
    logits = torch.randn(T, E, generator=g)
    return {
        "route": lambda: ops.route(logits, None, K, 1.0, True),
        "route_backward": lambda: ops.route_backward(None, w, probs, w, e, 1.0, True),
        "align": lambda: ops.align(e, E),
        "lora_forward": lambda: ops.lora_forward(x, A, B, w, e, 1.0, 0),
        "lora_backward": lambda: ops.lora_backward(dy, x, A, B, w, e, order, offsets, h, 1.0, 0),
        "lora_dense_forward": lambda: ops.lora_dense_forward(x, A, B, w, e, 1.0, 0),
        "lora_dense_backward": lambda: ops.lora_dense_backward(dy, x, A, B, w, e, h_all, 1.0, 0),
        "lora_dense_expand": lambda: ops.lora_dense_expand(h_all, B, w, e, 1.0, 0),
    }


def large_cases(torch, T, D, E):
    """The CPU benchmark's size (bench-cpu: T=4096, D=O=1024, K=2, R=16, fp32)."""
    ops = torch.ops.moe_ext
    g = torch.Generator().manual_seed(0)
    K, R = 2, 16
    x, dy = torch.randn(T, D, generator=g), torch.randn(T, D, generator=g)
    A, B = torch.randn(E, R, D, generator=g) / D ** 0.5, torch.randn(E, D, R, generator=g)
    _, w, e, _ = ops.route(torch.randn(T, E, generator=g), None, K, 1.0, True)
    _, h, order, offsets = ops.lora_forward(x, A, B, w, e, 1.0, 0)
    return {
        f"lora_forward T={T}": lambda: ops.lora_forward(x, A, B, w, e, 1.0, 0),
        f"lora_backward T={T}": lambda: ops.lora_backward(dy, x, A, B, w, e, order, offsets, h,
                                                          1.0, 0),
    }


def worker(args) -> None:
    """Times every case in this process (whose moe_ext._C is MOE_EXT_EXTENSION's) and prints
    {case: microseconds per call} as JSON."""
    import torch

    import moe_ext  # noqa: F401  (loads the ops)

    # One thread (the host code is serial; the kernels' work is the same per thread) and this
    # thread's CPU time, which other processes on a shared machine do not inflate the way they
    # do wall time.
    torch.set_num_threads(1)
    result = {}
    for name, call in tiny_cases(torch).items():
        for _ in range(200):  # warm-up
            call()
        batches = []
        for _ in range(7):
            start = time.thread_time()
            for _ in range(args.calls):
                call()
            batches.append((time.thread_time() - start) / args.calls * 1e6)
        result[name] = min(batches)  # the least disturbed batch
    if not args.no_large:  # the same measure: the kernels' own cost, not the machine's load
        for name, call in large_cases(torch, args.tokens, args.features, 8).items():
            call()  # warm-up
            times = []
            for _ in range(args.large_reps):
                start = time.thread_time()
                call()
                times.append((time.thread_time() - start) * 1e6)
            result[name] = statistics.median(times)
    print(json.dumps(result))


def run_build(path: str, args) -> dict:
    env = {**os.environ, "MOE_EXT_EXTENSION": os.path.abspath(path)}
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--calls", str(args.calls), "--tokens", str(args.tokens), "--features",
           str(args.features), "--large-reps", str(args.large_reps)] + \
        (["--no-large"] if args.no_large else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", help="the _C .so of an earlier build (omit: after only)")
    parser.add_argument("--after", default=None, help="default: this tree's moe_ext/_C*.so")
    parser.add_argument("--rounds", type=int, default=7, help="alternating runs of each build")
    parser.add_argument("--calls", type=int, default=2000, help="calls per timed batch (tiny)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--features", type=int, default=1024, help="D = O of the large cases")
    parser.add_argument("--large-reps", type=int, default=5)
    parser.add_argument("--no-large", action="store_true", help="tiny sizes only")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    after = args.after or sorted(glob.glob(os.path.join(HERE, "..", "moe_ext", "_C*.so")))[0]
    builds = {"before": args.before, "after": after} if args.before else {"after": after}
    runs: dict[str, list[dict]] = {name: [] for name in builds}
    for r in range(args.rounds):
        order = list(builds) if r % 2 == 0 else list(reversed(builds))
        for name in order:
            runs[name].append(run_build(builds[name], args))
            print(f"round {r + 1}/{args.rounds}: {name} done", file=sys.stderr)

    from harness import machine_facts, report

    rows = []
    for case in runs["after"][0]:
        row = {"case": case, "unit": "CPU us/call, 1 thread"}
        for name in builds:
            row[f"{name}_us"] = statistics.median(run[case] for run in runs[name])
        if "before" in builds:
            row["after_minus_before_us"] = row["after_us"] - row["before_us"]
            row["after_over_before"] = row["after_us"] / row["before_us"]
        rows.append(row)
    columns = list(rows[0])
    facts = machine_facts()
    text = report("call-overhead", rows, {**facts, "rounds": args.rounds}, args.out, columns)
    print(text)


if __name__ == "__main__":
    main()
