"""Shared benchmark harness: timing with warm-up and percentiles, machine facts, CSV and
markdown output and a plot. Benchmarks are scripts, never timed tests."""
from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Optional

import torch

import moe_ext
from moe_ext import plots


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


def measure_floors(device: str, dtype: torch.dtype) -> dict:
    """This machine's copy bandwidth (GB/s, read + write counted) and matmul rate
    (TFLOP/s in `dtype`), measured now, for time floors of the kernels."""
    n = (256 if device == "cuda" else 32) * 1024 * 1024 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    copy_ms = time_call(lambda: dst.copy_(src), reps=10)["median_ms"]
    size = 8192 if device == "cuda" else 1024
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    mm_ms = time_call(lambda: a @ b, reps=10)["median_ms"]
    return {"copy_GBps": 2 * n * 4 / copy_ms / 1e6, "matmul_TFLOPs": 2 * size ** 3 / mm_ms / 1e9}


def floor_ms(floors: dict, bytes_moved: float = 0.0, flops: float = 0.0) -> float:
    """Lower bound on a kernel's time from its bytes and FLOPs at the measured rates."""
    return max(bytes_moved / (floors["copy_GBps"] * 1e6), flops / (floors["matmul_TFLOPs"] * 1e9))


def bench_args(description: str, tokens: int = 8192, features: int = 4096):
    """The command-line options every GPU-suite script shares."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                        help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--tokens", type=int, default=tokens)
    parser.add_argument("--features", type=int, default=features, help="D = O")
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64, 256, 1024])
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    return args


def report(name: str, rows: list[dict], facts: dict, out: str, columns: list[str],
           plot: Optional[dict] = None) -> str:
    """Writes <out>/<name>-<device>.csv and .md, and with plot (keyword arguments of
    moe_ext.plots.benchmark_bars: x_key, series_key, panel_key) a .png of the median
    times; returns the markdown."""
    device = facts["gpu"] if facts["gpu"] != "none" else "cpu"
    tag = device.replace(" ", "_").lower()
    os.makedirs(out, exist_ok=True)
    write_csv(os.path.join(out, f"{name}-{tag}.csv"), [{**r, **facts} for r in rows])
    lines = [f"# {name} on {device}", "",
             f"torch {facts['torch']} (CUDA {facts['cuda']}), moe_ext {facts['moe_ext']}, commit {facts['commit']}, "
             f"{facts['date']}.", "", "| " + " | ".join(columns) + " |",
             "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c])
                                       for c in columns) + " |")
    text = "\n".join(lines) + "\n"
    write_text(os.path.join(out, f"{name}-{tag}.md"), text)
    if plot is not None:
        plots.benchmark_bars(rows, os.path.join(out, f"{name}-{tag}.png"),
                             title=f"{name} on {device}:", **plot)
    return text


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
        "cuda": torch.version.cuda or "none",
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
