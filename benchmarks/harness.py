"""Shared benchmark harness: timing with warm-up and percentiles, machine facts, CSV and
markdown output. Benchmarks are scripts, never timed tests."""
from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch

import moe_ext


def time_call(fn: Callable[[], object], warmup: int = 2, reps: int = 7) -> dict:
    """Median and p20/p80 wall time of fn() in milliseconds (CPU: perf_counter;
    CUDA: synchronised around each call)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else times * 4
    return {"median_ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[3]}


def machine_facts() -> dict:
    def cpu_model():
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor()

    def git_commit():
        try:
            return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                  text=True, cwd=os.path.dirname(__file__)).stdout.strip()
        except OSError:
            return "unknown"

    return {
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "torch": torch.__version__,
        "moe_ext": moe_ext.__version__,
        "python": platform.python_version(),
    }


def write_csv(path: str, rows: list[dict]) -> None:
    """Atomic write (temp file + rename) of rows with the union of their keys as columns."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
