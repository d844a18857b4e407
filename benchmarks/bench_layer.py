"""The whole MoLoRALinear layer against its base linear layer alone, forward and
forward+backward, and a sweep over the number of tokens; "separate add" is the layer with
a hooked base, which adds base(x) and the delta in a separate pass instead of in the GEMM;
"router unfused" (dense strategy only) the layer with a hooked router, whose logits then
take their own pass over x instead of coming from the experts' shrink GEMM.

Run: .venv/bin/python benchmarks/bench_layer.py [--device cuda] [--experts 8] [--strategy dense]
"""
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from harness import bench_args, fwd_and_fwd_bwd, machine_facts, report, time_call  # noqa: E402

from moe_ext import MoLoRAConfig, MoLoRALinear  # noqa: E402
from moe_ext.molora.functional import STRATEGIES, choose_strategy  # noqa: E402


def hooked(module: nn.Module, x: torch.Tensor, part: str) -> torch.Tensor:
    """module(x) with a no-op forward hook on module.<part>, which then runs as a module."""
    handle = getattr(module, part).register_forward_hook(lambda *_: None)
    try:
        return module(x)
    finally:
        handle.remove()


def main():
    args = bench_args(__doc__.split("\n")[0], options=lambda p: p.add_argument(
        "--strategy", choices=STRATEGIES, default="auto", help="MoLoRAConfig.strategy"))
    D = args.features
    rows = []
    for E in args.experts:
        for T in sorted({max(1, args.tokens // 8), args.tokens // 2, args.tokens}):
            base = nn.Linear(D, D, bias=False).to(args.device, args.dtype)
            config = MoLoRAConfig(r=args.rank, num_experts=E, top_k=args.top_k,
                                  strategy=args.strategy)
            layer = MoLoRALinear(base, config).to(args.device, args.dtype)
            x = torch.randn(T, D, device=args.device, dtype=args.dtype, requires_grad=True)
            cases = [("base linear", base, None), ("MoLoRALinear", layer, None),
                     ("MoLoRALinear, separate add", layer, lambda: hooked(layer, x, "base"))]
            dense = args.strategy == "dense" or (
                args.strategy == "auto" and choose_strategy(E, args.top_k, args.rank, x.device) == "dense")
            if dense:
                cases.append(("MoLoRALinear, router unfused", layer, lambda: hooked(layer, x, "router")))
            for name, module, fn in cases:
                wrt = tuple([x] + [p for p in module.parameters() if p.requires_grad])
                for mode, call in fwd_and_fwd_bwd(fn or (lambda module=module: module(x)), wrt):
                    t = time_call(call, reps=args.reps)
                    rows.append({"mode": mode, "module": name, "E": E, "T": T, "D": D,
                                 "median_us": 1e3 * t["median_ms"], "p20_us": 1e3 * t["p20_ms"],
                                 "p80_us": 1e3 * t["p80_ms"]})
    for r in rows:
        base = next(b for b in rows if b["module"] == "base linear" and b["mode"] == r["mode"]
                    and b["E"] == r["E"] and b["T"] == r["T"])
        r["x_base"] = r["median_us"] / base["median_us"]
        r["series"] = f"{r['module']} E={r['E']}"
    name = "layer" if args.strategy == "auto" else f"layer-{args.strategy}"
    print(report(name, rows, machine_facts(), args.out,
                 ["mode", "module", "E", "T", "median_us", "p20_us", "p80_us", "x_base"],
                 device=args.device, plot=dict(x_key="T", series_key="series")))


if __name__ == "__main__":
    main()
