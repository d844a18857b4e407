"""The dense-gated op lora_dense, forward and forward+backward, against PyTorch ops.

moe_ext's kernels (on CUDA the fused tensor-core kernels where they apply) vs the same three
steps in PyTorch ops (x A_all^T, the routing weights scattered into a (T, E) gate, one GEMM with
B_all), against the floors measured in the same run. R = --rank; D = O = --features.

Run: .venv/bin/python benchmarks/bench_lora_dense.py [--device cuda] [--experts 8 16]
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from harness import (bench_args, fwd_and_fwd_bwd, machine_facts, measure_floors, report,  # noqa: E402
                     timed_row)

from moe_ext import ops, reference  # noqa: E402


def torch_dense(x, A, B, w, experts, scaling):
    """The dense-gated form in PyTorch ops (what functional.py ran before the fused op)."""
    E, R, D = A.shape
    h_all = (x @ A.reshape(E * R, D).T).view(-1, E, R)
    gated = h_all * (scaling * reference.gates(w, experts, E, 0)).to(x.dtype)[:, :, None]
    return gated.reshape(-1, E * R) @ B.permute(0, 2, 1).reshape(E * R, -1)


def main():
    args = bench_args(__doc__.split("\n")[0])
    floors = measure_floors(args.device, args.dtype)
    rows = []
    T, D, K, R = args.tokens, args.features, args.top_k, args.rank
    for E in args.experts:
        g = torch.Generator().manual_seed(E)
        make = lambda *s: torch.randn(*s, generator=g).to(args.device, args.dtype)  # noqa: E731
        x = make(T, D).requires_grad_()
        A, B = (make(E, R, D) / D ** 0.5).requires_grad_(), (make(E, D, R) / R ** 0.5).requires_grad_()
        r = ops.route(torch.randn(T, E, generator=g).to(args.device), min(K, E))
        w = r.weights.to(ops.acc_dtype(args.dtype)).requires_grad_()
        el = x.element_size()
        nbytes = (2 * T * D + T * E * R) * el + 2 * E * R * D * el + T * K * 12
        flops = 2 * T * E * R * 2 * D
        for provider, fn in (("moe_ext", ops.lora_dense), ("torch", torch_dense)):
            call_fn = lambda fn=fn: fn(x, A, B, w, r.experts, 2.0)  # noqa: E731
            for mode, call in fwd_and_fwd_bwd(call_fn, (x, A, B, w)):
                scale = (1.0, 1.0) if mode == "fwd" else (3.0, 3.0)  # backward reads/does more
                rows.append(timed_row(call, floors, args.reps, scale[0] * nbytes, scale[1] * flops,
                                      mode=mode, provider=provider, E=E, T=T, D=D, R=R))
    facts = {**machine_facts(), **floors}
    print(report("lora_dense", rows, facts, args.out,
                 ["mode", "provider", "E", "median_us", "p20_us", "p80_us", "floor_us", "x_floor"],
                 device=args.device, plot=dict(x_key="E", series_key="provider")))


if __name__ == "__main__":
    main()
