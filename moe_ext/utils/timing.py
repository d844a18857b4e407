"""Wall-clock timing shared by the benchmarks, `moe-ext bench` and the demo."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def time_call(fn: Callable[[], object], warmup: int = 2, reps: int = 7) -> dict:
    """Median and p20/p80 wall time of fn() in milliseconds over `reps` calls after `warmup`
    calls; CUDA work is synchronised around each call when a GPU is present."""
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
