"""CPU benchmark: functional.molora forward and forward+backward against the ways people
compute MoLoRA today. fp32, T=4096, D=O=1024, K=2, R=16, E in {8, 64}, 2 threads.

Providers:
  moe_ext         functional.molora, strategy "auto" (the C++ kernels)
  moe_ext-dense   functional.molora, strategy "dense" (dense-gated: ATen GEMMs + C++ gate)
  loop            a PyTorch loop over experts, as MixLoRA-style libraries do it
                  (softmax, topk, per expert: index, two matmuls, index_add)
  dense-soft      dense soft routing over all experts (LoRAMoE style, a different model:
                  every expert runs on every token), as plain PyTorch GEMMs
  reference       moe_ext.reference.molora (pure PyTorch, expert by expert)

Run: .venv/bin/python benchmarks/bench_cpu.py [--threads 2] [--reps 7]
Writes benchmarks/results/cpu.csv and benchmarks/results/cpu.md.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from harness import machine_facts, time_call, write_csv, write_text  # noqa: E402

from moe_ext import functional, reference  # noqa: E402
from moe_ext.baselines import dense_soft, loop_over_experts  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")


PROVIDERS = {
    "moe_ext": lambda *a: functional.molora(*a),
    "moe_ext-dense": lambda *a: functional.molora(*a, strategy="dense"),
    "loop": loop_over_experts,
    "dense-soft": dense_soft,
    "reference": lambda *a: reference.molora(*a),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    T, D, O, K, R = args.tokens, 1024, 1024, 2, 16
    facts = machine_facts()
    rows = []
    for E in args.experts:
        g = torch.Generator().manual_seed(E)
        x = torch.randn(T, D, generator=g).requires_grad_()
        logits = torch.randn(T, E, generator=g).requires_grad_()
        A = (torch.randn(E, R, D, generator=g) / D ** 0.5).requires_grad_()
        B = (torch.randn(E, O, R, generator=g) / R ** 0.5).requires_grad_()
        inputs = (x, logits, A, B, K, 2.0)
        for name, fn in PROVIDERS.items():
            reps = max(2, args.reps // 3) if name == "reference" else args.reps

            def fwd():
                with torch.no_grad():
                    fn(*inputs)

            def fwd_bwd():
                y = fn(*inputs)
                torch.autograd.grad(y, (x, logits, A, B), torch.ones_like(y), allow_unused=True)

            tf, tb = time_call(fwd, reps=reps), time_call(fwd_bwd, reps=reps)
            rows.append({"E": E, "provider": name, "T": T, "D": D, "O": O, "K": K, "R": R,
                         "fwd_ms": round(tf["median_ms"], 2), "fwd_p20_ms": round(tf["p20_ms"], 2),
                         "fwd_p80_ms": round(tf["p80_ms"], 2),
                         "fwd_bwd_ms": round(tb["median_ms"], 2),
                         "fwd_bwd_p20_ms": round(tb["p20_ms"], 2),
                         "fwd_bwd_p80_ms": round(tb["p80_ms"], 2), **facts})
            print(f"E={E:<4} {name:<14} fwd {tf['median_ms']:8.2f} ms   fwd+bwd {tb['median_ms']:8.2f} ms",
                  flush=True)
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "cpu.csv"), rows)
    write_text(os.path.join(args.out, "cpu.md"), markdown(rows, facts, args))


def markdown(rows, facts, args) -> str:
    lines = [
        "# CPU benchmark: MoLoRA delta forward and forward+backward",
        "",
        f"Machine: {facts['cpu']}, {facts['cores']} cores, {facts['threads']} threads, "
        f"ATen CPU capability {facts['cpu_capability']}.  ",
        f"Versions: torch {facts['torch']}, moe_ext {facts['moe_ext']}, Python {facts['python']}.  ",
        f"Commit {facts['commit']}, date {facts['date']}.  ",
        f"Command: `.venv/bin/python benchmarks/bench_cpu.py --threads {args.threads} --reps {args.reps}`",
        "",
        f"fp32, T={rows[0]['T']}, D=O={rows[0]['D']}, K={rows[0]['K']}, R={rows[0]['R']}; "
        "median of the reps, milliseconds; speed-up = loop time / provider time.",
        "",
        "| E | provider | fwd ms | fwd+bwd ms | fwd speed-up vs loop | fwd+bwd speed-up vs loop |",
        "|---|---|---|---|---|---|",
    ]
    for E in sorted({r["E"] for r in rows}):
        sub = [r for r in rows if r["E"] == E]
        loop = next(r for r in sub if r["provider"] == "loop")
        for r in sub:
            lines.append(f"| {E} | {r['provider']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | "
                         f"{loop['fwd_ms'] / r['fwd_ms']:.2f}x | {loop['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}x |")
    lines += ["", "dense-soft runs every expert on every token (a different, denser model); it is "
              "listed because it is what LoRAMoE-style code does.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
