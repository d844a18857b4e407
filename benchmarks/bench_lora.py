"""The LoRA-expert delta, forward and forward+backward: moe_ext (auto / sparse / dense)
vs the loop over experts (MixLoRA style), dense soft routing (LoRAMoE style: every expert
on every token, a different, denser model), torch grouped_mm (where the GPU has it) and
the reference, against floors measured in the same run; x_loop is the speed-up over the
loop over experts.

Run: .venv/bin/python benchmarks/bench_lora.py [--device cuda] [--experts 8 64 256 1024]
CPU (make bench-cpu): bench_lora.py --device cpu --tokens 4096 --features 1024 --experts 8 64
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from harness import (bench_args, fwd_and_fwd_bwd, machine_facts, measure_floors, report,  # noqa: E402
                     timed_row)

from moe_ext import functional, ops, reference  # noqa: E402
from moe_ext.molora.baselines import dense_soft, loop_over_experts  # noqa: E402


def grouped_mm_delta(x, logits, A, B, top_k, scaling):
    """Sort pairs by expert, two torch._grouped_mm calls, weighted scatter-add back."""
    r = ops.route(logits, top_k)
    order, offsets = ops.align(r.experts, A.shape[0])
    tokens = order // top_k
    xs = x[tokens]
    offs = offsets[1:].to(torch.int32)
    h = torch._grouped_mm(xs, A.transpose(1, 2), offs=offs)
    y = torch._grouped_mm(h, B.transpose(1, 2), offs=offs)
    y = y * (scaling * r.weights.flatten()[order]).to(y.dtype)[:, None]
    return torch.zeros(x.shape[0], B.shape[1], device=x.device, dtype=y.dtype).index_add_(0, tokens, y)


def main():
    args = bench_args(__doc__.split("\n")[0])
    floors = measure_floors(args.device, args.dtype)
    T, D, K, R = args.tokens, args.features, args.top_k, args.rank
    providers = {"moe_ext": lambda *a: functional.molora(*a),
                 "moe_ext-sparse": lambda *a: functional.molora(*a, strategy="sparse"),
                 "moe_ext-dense": lambda *a: functional.molora(*a, strategy="dense"),
                 "loop": loop_over_experts, "dense-soft": dense_soft}
    if args.device == "cuda" and hasattr(torch, "_grouped_mm"):
        providers["grouped_mm"] = grouped_mm_delta
    rows = []
    for E in args.experts:
        g = torch.Generator().manual_seed(E)
        make = lambda *s: torch.randn(*s, generator=g).to(args.device, args.dtype)  # noqa: E731
        x, logits = make(T, D).requires_grad_(), make(T, E).requires_grad_()
        A, B = (make(E, R, D) / D ** 0.5).requires_grad_(), (make(E, D, R) / R ** 0.5).requires_grad_()
        inputs = (x, logits, A, B, K, 2.0)
        el = x.element_size()
        fwd_bytes = 2 * T * D * el + E * R * 2 * D * el
        fwd_flops = 2 * T * K * R * 2 * D
        todo = dict(providers)
        if E <= 64:
            todo["reference"] = lambda *a: reference.molora(*a)
        for name, fn in todo.items():
            reps = max(2, args.reps // 3) if name == "reference" else args.reps
            for mode, call in fwd_and_fwd_bwd(lambda fn=fn: fn(*inputs), (x, logits, A, B)):
                scale = (1.0, 1.0) if mode == "fwd" else (3.5, 3.0)  # backward reads/does more
                try:
                    rows.append(timed_row(call, floors, reps, scale[0] * fwd_bytes,
                                          scale[1] * fwd_flops, mode=mode, provider=name, E=E,
                                          T=T, D=D, K=K, R=R))
                except (RuntimeError, NotImplementedError) as err:  # e.g. grouped_mm dtype limits
                    print(f"skip {name} E={E} {mode}: {str(err)[:120]}")
    for r in rows:
        loop = [b for b in rows if b["provider"] == "loop" and b["mode"] == r["mode"]
                and b["E"] == r["E"]]
        r["x_loop"] = loop[0]["median_us"] / r["median_us"] if loop else float("nan")
    facts = {**machine_facts(), **floors}
    print(report("lora", rows, facts, args.out,
                 ["mode", "provider", "E", "median_us", "p20_us", "p80_us", "floor_us", "x_floor",
                  "x_loop"], device=args.device, plot=dict(x_key="E", series_key="provider")))


if __name__ == "__main__":
    main()
