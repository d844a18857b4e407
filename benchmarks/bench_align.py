"""Alignment (the stable counting sort of the (token, k) pairs by expert): moe_ext vs a
stable torch.sort + scatter-add counts (reference.align), against the memory floor.

Run: .venv/bin/python benchmarks/bench_align.py [--device cuda] [--experts 8 64 256 1024]
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from harness import bench_args, machine_facts, measure_floors, report, timed_row  # noqa: E402

from moe_ext import ops, reference  # noqa: E402


def main():
    args = bench_args(__doc__.split("\n")[0])
    floors = measure_floors(args.device, args.dtype)
    rows = []
    T, K = args.tokens, args.top_k
    for E in args.experts:
        experts = ops.route(torch.randn(T, E, device=args.device), K).experts
        nbytes = 2 * T * K * 8  # ids in, order out
        # torch: a stable torch.sort and scatter-add counts (reference.align)
        for provider, align in (("moe_ext", ops.align), ("torch", reference.align)):
            rows.append(timed_row(lambda align=align: align(experts, E), floors, args.reps, nbytes,
                                  provider=provider, E=E, T=T, K=K))
    facts = {**machine_facts(), **floors}
    print(report("align", rows, facts, args.out,
                 ["provider", "E", "median_us", "p20_us", "p80_us", "floor_us", "x_floor"],
                 device=args.device, plot=dict(x_key="E", series_key="provider")))


if __name__ == "__main__":
    main()
