"""Routing from logits (softmax, top-K, renormalise, counts): moe_ext vs the PyTorch ops
people use, forward and forward+backward, against the memory floor.

Run: .venv/bin/python benchmarks/bench_route.py [--device cuda] [--experts 8 64 256 1024]
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from harness import (bench_args, fwd_and_fwd_bwd, machine_facts, measure_floors, report,  # noqa: E402
                     timed_row)

from moe_ext import ops, reference  # noqa: E402


def torch_route(logits, k):
    probs = torch.softmax(logits.float(), -1)
    w, e = probs.topk(k, -1)
    return probs, w / w.sum(-1, keepdim=True), e, reference.bin_counts(e, logits.shape[1])


def main():
    args = bench_args(__doc__.split("\n")[0])
    floors = measure_floors(args.device, args.dtype)
    rows = []
    T, K = args.tokens, args.top_k
    for E in args.experts:
        logits = torch.randn(T, E, device=args.device).to(args.dtype).requires_grad_()
        elem = logits.element_size()
        fwd_bytes = T * E * (elem + 4) + T * K * (4 + 8)  # logits in; probs, weights, ids out
        for provider, route in (("moe_ext", ops.route), ("torch", torch_route)):
            fn = lambda route=route: route(logits, K)[:2]  # noqa: E731  (probs, weights)
            for mode, call in fwd_and_fwd_bwd(fn, (logits,)):
                nbytes = fwd_bytes if mode == "fwd" else 3 * fwd_bytes
                rows.append(timed_row(call, floors, args.reps, nbytes, mode=mode,
                                      provider=provider, E=E, T=T, K=K))
    facts = {**machine_facts(), **floors}
    print(report("route", rows, facts, args.out,
                 ["mode", "provider", "E", "median_us", "p20_us", "p80_us", "floor_us", "x_floor"],
                 device=args.device, plot=dict(x_key="E", series_key="provider")))


if __name__ == "__main__":
    main()
