"""Generation speed of a PMoL model: onnxruntime (export_causal_lm + OrtCausalLM.generate)
against PyTorch (transformers' generate on the same MoLoRA model), tokens per second for the
prefill and for decoding with the KV cache, at batch 1 and 8.

The model is a random-weight Llama (built from a config, no download) with a PMoL adapter
on every linear layer: 3 groups of 2 LoRA experts + 1 null expert, top-2, r=8. Prefill:
one forward over the prompt (B x S tokens). Decode: (time of generate(n) - time of
generate(1)) / (n - 1) per step of B tokens, EOS off, greedy. Medians of --reps runs; both
engines are timed in the same run, alternating, so their ratio is what to read.

    python benchmarks/bench_generate.py --device cpu --threads 2
"""
from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch

from harness import machine_facts, pmol_llama, report
from moe_ext.export import OrtCausalLM, export_causal_lm
from moe_ext.utils.io import write_text
from moe_ext.utils.timing import time_call


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads, both engines")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def build_model(args) -> torch.nn.Module:
    model = pmol_llama(args.vocab, args.hidden, args.layers, int(2.6875 * args.hidden),
                       max_positions=4096, lora_std=0.02)
    return model.to(args.device)


def session_options(threads):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # no busy-waiting of onnxruntime's threads after a run: it would steal the cores from
    # PyTorch, timed right after (this can only make onnxruntime slower, not faster)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    return options


def time_engines(model, lm, B: int, args) -> list[dict]:
    S, n = args.prompt_length, args.new_tokens
    g = torch.Generator().manual_seed(B)
    ids = torch.randint(3, args.vocab, (B, S), generator=g)
    mask = torch.ones_like(ids)
    ids_d, mask_d = ids.to(args.device), mask.to(args.device)

    def torch_generate(k):
        with torch.no_grad():
            model.generate(input_ids=ids_d, attention_mask=mask_d, max_new_tokens=k,
                           min_new_tokens=k, do_sample=False, pad_token_id=0)

    def torch_prefill():
        with torch.no_grad():
            model(input_ids=ids_d, attention_mask=mask_d, use_cache=True, logits_to_keep=1)

    calls = {
        ("prefill", "onnxruntime"): lambda: lm(ids.numpy(), mask.numpy()),
        ("prefill", "pytorch"): torch_prefill,
        ("generate1", "onnxruntime"): lambda: lm.generate(ids.numpy(), mask.numpy(), max_new_tokens=1, eos_token_id=[]),
        ("generate1", "pytorch"): lambda: torch_generate(1),
        ("generateN", "onnxruntime"): lambda: lm.generate(ids.numpy(), mask.numpy(), max_new_tokens=n, eos_token_id=[]),
        ("generateN", "pytorch"): lambda: torch_generate(n),
    }
    times = {key: [] for key in calls}
    for _ in range(args.reps):  # alternate the engines so that noise hits both alike
        for key, call in calls.items():
            times[key].append(time_call(call, warmup=1 if not times[key] else 0, reps=1)["median_ms"])
    med = {key: float(np.median(v)) for key, v in times.items()}
    rows = []
    for engine in ("onnxruntime", "pytorch"):
        # a decode step per rep from the two generate calls of that rep (taken back to back),
        # then the median: a difference of medians would pair calls from different reps
        step = float(np.median([(a - b) / (n - 1) for a, b in
                                zip(times[("generateN", engine)], times[("generate1", engine)])]))
        rows.append({"batch": B, "phase": "prefill", "engine": engine,
                     "ms": med[("prefill", engine)], "tokens_per_s": 1e3 * B * S / med[("prefill", engine)]})
        rows.append({"batch": B, "phase": "decode", "engine": engine, "ms": step,
                     "tokens_per_s": 1e3 * B / step})
    for phase in ("prefill", "decode"):
        ort_row, torch_row = [r for r in rows if r["phase"] == phase]
        ort_row["ort_speedup"] = torch_row["ms"] / ort_row["ms"]
        torch_row["ort_speedup"] = 1.0
    return rows


def main():
    args = parse_args()
    model = build_model(args)
    dtype = "float16" if args.device == "cuda" else "float32"
    providers = ["CUDAExecutionProvider"] if args.device == "cuda" else ["CPUExecutionProvider"]
    with tempfile.TemporaryDirectory() as tmp:
        path = export_causal_lm(model, os.path.join(tmp, "lm.onnx"), dtype=dtype)
        if dtype == "float16":
            model = model.half()
        lm = OrtCausalLM(path, providers, session_options(args.threads))
        rows = [row for B in args.batch for row in time_engines(model, lm, B, args)]
    facts = machine_facts()
    text = report("generate", rows, facts, args.out, ["batch", "phase", "engine", "ms", "tokens_per_s",
                                                      "ort_speedup"],
                  device=args.device, plot=dict(x_key="batch", series_key="engine",
                                                panel_key="phase", value_key="tokens_per_s"))
    heads = max(1, args.hidden // 64)
    note = (f"\nModel: random-weight Llama, hidden {args.hidden}, {args.layers} layers, {heads} "
            f"heads ({max(1, heads // 2)} KV heads), vocab {args.vocab}; PMoL adapter on every linear "
            f"layer (3 groups x 2 LoRA experts + 1 null expert, top-2, r=8); {dtype}. Prompt "
            f"{args.prompt_length} tokens, {args.new_tokens} new tokens, greedy, EOS off; {args.reps} "
            f"reps, engines alternating (onnxruntime threads do not spin between runs). "
            f"ms: prefill per call, decode per step (B tokens); "
            f"ort_speedup = PyTorch ms / onnxruntime ms. onnxruntime {_ort_version()} on "
            f"{lm.providers[0]}.\n")
    tag = facts["gpu"].replace(" ", "_").lower() if args.device == "cuda" else "cpu"
    write_text(os.path.join(args.out, f"generate-{tag}.md"), text + note)
    print(text + note)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    main()
