"""`moe-ext bench`: a quick forward+backward timing of functional.molora against the loop
over experts and dense soft routing on this machine. The full, recorded benchmarks are
the scripts in benchmarks/."""
from __future__ import annotations

import statistics
import time

import torch

from . import functional
from .baselines import dense_soft, loop_over_experts

PROVIDERS = {"moe_ext": functional.molora, "loop": loop_over_experts, "dense-soft": dense_soft}


def time_fwd_bwd(fn, inputs, reps: int) -> float:
    """Median milliseconds of forward + backward."""
    x, logits, A, B = inputs[:4]

    def step():
        y = fn(*inputs)
        torch.autograd.grad(y, (x, logits, A, B), torch.ones_like(y), allow_unused=True)
        if y.is_cuda:
            torch.cuda.synchronize()

    step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(tokens=2048, features=1024, experts=(8, 64), top_k=2, rank=16, reps=5,
        device="cpu", dtype=torch.float32) -> list[dict]:
    rows = []
    for E in experts:
        g = torch.Generator().manual_seed(E)
        make = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
        x = make(tokens, features).requires_grad_()
        logits = make(tokens, E).requires_grad_()
        A = (make(E, rank, features) / features ** 0.5).requires_grad_()
        B = (make(E, features, rank) / rank ** 0.5).requires_grad_()
        inputs = (x, logits, A, B, top_k, 2.0)
        times = {name: time_fwd_bwd(fn, inputs, reps) for name, fn in PROVIDERS.items()}
        for name, ms in times.items():
            rows.append({"E": E, "provider": name, "fwd_bwd_ms": ms,
                         "speedup_vs_loop": times["loop"] / ms})
    return rows
