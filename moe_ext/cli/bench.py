"""`moe-ext bench`: a quick forward+backward timing of functional.molora against the loop
over experts and dense soft routing on this machine. The full, recorded benchmarks are
the scripts in benchmarks/."""
from __future__ import annotations

import torch

from ..molora import functional
from ..molora.baselines import dense_soft, loop_over_experts
from ..utils.timing import time_call
from .common import (add_json, count_int, experts_int, fail, print_json, tokens_int, width_int)

PROVIDERS = {"moe_ext": functional.molora, "loop": loop_over_experts, "dense-soft": dense_soft}


def run(tokens=2048, features=1024, experts=(8, 64), top_k=2, rank=16, reps=5,
        device="cpu", dtype=torch.float32) -> list[dict]:
    """One row per (E, provider): median forward+backward milliseconds and the speed-up
    over the loop over experts."""
    rows = []
    for E in experts:
        g = torch.Generator().manual_seed(E)
        make = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
        x = make(tokens, features).requires_grad_()
        logits = make(tokens, E).requires_grad_()
        A = (make(E, rank, features) / features ** 0.5).requires_grad_()
        B = (make(E, features, rank) / rank ** 0.5).requires_grad_()
        inputs = (x, logits, A, B, top_k, 2.0)

        def step(fn):
            y = fn(*inputs)
            torch.autograd.grad(y, (x, logits, A, B), torch.ones_like(y), allow_unused=True)

        times = {name: time_call(lambda fn=fn: step(fn), warmup=1, reps=reps)["median_ms"]
                 for name, fn in PROVIDERS.items()}
        for name, ms in times.items():
            rows.append({"E": E, "provider": name, "fwd_bwd_ms": ms,
                         "speedup_vs_loop": times["loop"] / ms})
    return rows


def cmd_bench(args) -> int:
    """Quick forward+backward timing against the loop over experts and dense routing."""
    if any(e < args.top_k for e in args.experts):
        return fail(f"every --experts value must be >= --top-k ({args.top_k})")
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    rows = run(args.tokens, args.features, tuple(args.experts), args.top_k, args.rank, args.reps,
               device)
    if args.json:
        print_json({"device": device, "rows": rows})
        return 0
    print(f"forward+backward, fp32 on {device}, T={args.tokens}, D=O={args.features}, "
          f"K={args.top_k}, R={args.rank}, median of {args.reps}")
    for r in rows:
        print(f"  E={r['E']:<5} {r['provider']:<11} {r['fwd_bwd_ms']:9.2f} ms   "
              f"{r['speedup_vs_loop']:5.2f}x vs loop")
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="quick timing of the MoLoRA kernels against the loop over experts",
                       description="Forward+backward of functional.molora, a PyTorch loop over "
                                   "experts (MixLoRA style) and dense soft routing. The recorded "
                                   "benchmarks are the scripts in benchmarks/.")
    p.add_argument("--tokens", type=tokens_int, default=2048)
    p.add_argument("--features", type=width_int, default=1024, help="D = O")
    p.add_argument("--experts", type=experts_int, nargs="+", default=[8, 64])
    p.add_argument("--top-k", type=experts_int, default=2)
    p.add_argument("--rank", type=width_int, default=16)
    p.add_argument("--reps", type=count_int, default=5)
    p.add_argument("--cpu", action="store_true", help="time on the CPU even with a GPU")
    add_json(p, "the rows")
    p.set_defaults(func=cmd_bench)
