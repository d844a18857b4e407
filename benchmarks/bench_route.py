"""Routing from logits (softmax, top-K, renormalise, counts) and alignment (counting sort
by expert): moe_ext vs the PyTorch ops people use, against the memory floor.

Run: .venv/bin/python benchmarks/bench_route.py [--device cuda] [--experts 8 64 256 1024]
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from harness import bench_args, floor_ms, machine_facts, measure_floors, report, time_call  # noqa: E402

from moe_ext import ops  # noqa: E402


def torch_route(logits, k):
    probs = torch.softmax(logits.float(), -1)
    w, e = probs.topk(k, -1)
    return probs, w / w.sum(-1, keepdim=True), e, torch.bincount(e.flatten(), minlength=logits.shape[1])


def torch_align(experts, bins):
    flat = experts.flatten()
    return torch.sort(flat, stable=True).indices, torch.bincount(flat, minlength=bins).cumsum(0)


def main():
    args = bench_args(__doc__.split("\n")[0])
    floors = measure_floors(args.device, args.dtype)
    rows = []
    T, K = args.tokens, args.top_k
    for E in args.experts:
        logits = torch.randn(T, E, device=args.device).to(args.dtype)
        experts = ops.route(logits, K).experts
        elem = logits.element_size()
        route_bytes = T * E * (elem + 4) + T * K * (4 + 8)
        align_bytes = 2 * T * K * 8
        for op, provider, fn, nbytes in [
                ("route", "moe_ext", lambda: ops.route(logits, K), route_bytes),
                ("route", "torch", lambda: torch_route(logits, K), route_bytes),
                ("align", "moe_ext", lambda: ops.align(experts, E), align_bytes),
                ("align", "torch", lambda: torch_align(experts, E), align_bytes)]:
            t = time_call(fn, reps=args.reps)
            f = floor_ms(floors, nbytes)
            rows.append({"op": op, "provider": provider, "E": E, "T": T, "K": K,
                         "median_us": 1e3 * t["median_ms"], "p20_us": 1e3 * t["p20_ms"],
                         "p80_us": 1e3 * t["p80_ms"], "floor_us": 1e3 * f,
                         "x_floor": t["median_ms"] / f})
    facts = {**machine_facts(), **floors}
    print(report("route", rows, facts, args.out,
                 ["op", "provider", "E", "median_us", "p20_us", "p80_us", "floor_us", "x_floor"],
                 plot=dict(x_key="E", series_key="provider", panel_key="op")))


if __name__ == "__main__":
    main()
