"""Shared benchmark harness: timing with warm-up and percentiles, machine facts, CSV and
markdown output and a plot. Benchmarks are scripts, never timed tests."""
from __future__ import annotations

import csv
import os
import sys
from typing import Optional

import torch

from moe_ext.utils import plots
from moe_ext.utils.facts import run_facts
from moe_ext.utils.io import atomic_write, write_text
from moe_ext.utils.timing import time_call


def measure_floors(device: str, dtype: torch.dtype) -> dict:
    """This machine's copy bandwidth (GB/s, read + write counted) and matmul rate
    (TFLOP/s in `dtype`), measured now, for time floors of the kernels."""
    n = (256 if device == "cuda" else 32) * 1024 * 1024 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    copy_ms = time_call(lambda: dst.copy_(src), reps=10)["median_ms"]
    size = 8192 if device == "cuda" else 1024
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    mm_ms = time_call(lambda: a @ b, reps=10)["median_ms"]
    return {"copy_GBps": 2 * n * 4 / copy_ms / 1e6, "matmul_TFLOPs": 2 * size ** 3 / mm_ms / 1e9}


def floor_ms(floors: dict, bytes_moved: float = 0.0, flops: float = 0.0) -> float:
    """Lower bound on a kernel's time from its bytes and FLOPs at the measured rates."""
    return max(bytes_moved / (floors["copy_GBps"] * 1e6), flops / (floors["matmul_TFLOPs"] * 1e9))


def timed_row(call, floors: dict, reps: int, bytes_moved: float = 0.0, flops: float = 0.0,
              **labels) -> dict:
    """Times call() and returns labels plus median / p20 / p80 microseconds, the floor from
    bytes_moved and flops at the measured rates, and x_floor = median / floor."""
    t = time_call(call, reps=reps)
    f = floor_ms(floors, bytes_moved, flops)
    return {**labels, "median_us": 1e3 * t["median_ms"], "p20_us": 1e3 * t["p20_ms"],
            "p80_us": 1e3 * t["p80_ms"], "floor_us": 1e3 * f, "x_floor": t["median_ms"] / f}


def fwd_and_fwd_bwd(fn, wrt: tuple) -> list[tuple[str, object]]:
    """[("fwd", no-grad call of fn), ("fwd+bwd", fn then the gradient of its output(s),
    with all-ones seeds, to the tensors `wrt`)]."""
    def fwd():
        with torch.no_grad():
            fn()

    def fwd_bwd():
        out = fn()
        outs = out if isinstance(out, (tuple, list)) else (out,)
        torch.autograd.grad(outs, wrt, [torch.ones_like(o) for o in outs], allow_unused=True)

    return [("fwd", fwd), ("fwd+bwd", fwd_bwd)]


def bench_args(description: str, tokens: int = 8192, features: int = 4096, options=None):
    """The command-line options every GPU-suite script shares; `options(parser)` adds a
    script's own."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    if options is not None:
        options(parser)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                        help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--tokens", type=int, default=tokens)
    parser.add_argument("--features", type=int, default=features, help="D = O")
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64, 256, 1024])
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    return args


def report(name: str, rows: list[dict], facts: dict, out: str, columns: list[str],
           device: str = "cpu", plot: Optional[dict] = None) -> str:
    """Writes <out>/<name>-<device>.csv and .md (device: "cpu" or the GPU's name), and with
    plot (keyword arguments of moe_ext.utils.plots.benchmark_bars: x_key, series_key,
    panel_key) a .png of the median times; returns the markdown."""
    where = facts["gpu"] if device == "cuda" else "cpu"
    tag = where.replace(" ", "_").lower()
    os.makedirs(out, exist_ok=True)
    write_csv(os.path.join(out, f"{name}-{tag}.csv"), [{**r, **facts} for r in rows])
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    lines = [f"# {name} on {where}", "",
             f"Machine: {facts['cpu']}, {facts['cores']} cores, {facts['threads']} threads"
             f"{', GPU ' + facts['gpu'] if device == 'cuda' else ''}.  ",
             f"torch {facts['torch']} (CUDA {facts['cuda']}), moe_ext {facts['moe_ext']}, "
             f"commit {facts['commit']}, {facts['date']}.  ", f"Command: `{command}`", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c])
                                       for c in columns) + " |")
    text = "\n".join(lines) + "\n"
    write_text(os.path.join(out, f"{name}-{tag}.md"), text)
    if plot is not None:
        plots.benchmark_bars(rows, os.path.join(out, f"{name}-{tag}.png"),
                             title=f"{name} on {where}:", **plot)
    return text


def pmol_llama(vocab: int, hidden: int, layers: int, intermediate: int, max_positions: int,
               lora_std: float) -> torch.nn.Module:
    """A random-weight Llama (built from a config, no download; seed 0, eval mode) with a PMoL
    adapter on every linear: groups concise / safe / verbose of 2 experts, a null expert,
    rank 8, top-2, lora_B drawn from N(0, lora_std) so that the experts change the output."""
    import transformers

    import moe_ext
    from moe_ext.pmol.dpo import pmol_config

    torch.manual_seed(0)
    heads = max(1, hidden // 64)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2), max_position_embeddings=max_positions,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
    moe_ext.get_molora_model(model, pmol_config(["concise", "safe", "verbose"], 2, 1, r=8,
                                                lora_alpha=16.0, top_k=2, target_modules="all-linear"))
    with torch.no_grad():
        for layer in moe_ext.molora_layers(model).values():
            layer.lora_B.normal_(0, lora_std)
    return model


def machine_facts() -> dict:
    """Date, commit, machine and versions of this run (moe_ext.utils.facts)."""
    return run_facts(os.path.dirname(os.path.abspath(__file__)))


def write_csv(path: str, rows: list[dict]) -> None:
    """Atomic write of rows with the union of their keys as columns."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)
