"""The dense-gated strategy's mask (gate_dense, forward and forward+backward): moe_ext's
kernel vs the same mask in PyTorch ops (scatter the routing weights into a (T, E) gate
matrix, broadcast-multiply), against the memory floor. R = --rank, E*R columns.

Run: .venv/bin/python benchmarks/bench_gate_dense.py [--device cuda] [--experts 8 16]
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from harness import (bench_args, fwd_and_fwd_bwd, machine_facts, measure_floors, report,  # noqa: E402
                     timed_row)

from moe_ext import ops, reference  # noqa: E402


def main():
    args = bench_args(__doc__.split("\n")[0])
    floors = measure_floors(args.device, args.dtype)
    rows = []
    T, K, R = args.tokens, args.top_k, args.rank
    for E in args.experts:
        r = ops.route(torch.randn(T, E, device=args.device), K)
        w = r.weights.to(ops.acc_dtype(args.dtype)).requires_grad_()
        h_all = torch.randn(T, E * R, device=args.device, dtype=args.dtype, requires_grad=True)
        nbytes = 2 * h_all.numel() * h_all.element_size() + T * K * 12
        for provider, gate in (("moe_ext", ops.gate_dense), ("torch", reference.gate_dense)):
            fn = lambda gate=gate: gate(h_all, w, r.experts, E, 0, 2.0)  # noqa: E731
            for mode, call in fwd_and_fwd_bwd(fn, (h_all, w)):
                n = nbytes if mode == "fwd" else 2.5 * nbytes
                rows.append(timed_row(call, floors, args.reps, n, mode=mode, provider=provider,
                                      E=E, T=T, R=R))
    facts = {**machine_facts(), **floors}
    print(report("gate_dense", rows, facts, args.out,
                 ["mode", "provider", "E", "median_us", "p20_us", "p80_us", "floor_us", "x_floor"],
                 device=args.device, plot=dict(x_key="E", series_key="provider")))


if __name__ == "__main__":
    main()
