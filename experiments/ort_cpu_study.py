"""onnxruntime on the CPU for PMoL generation graphs: graph-optimisation levels and int8
dynamic quantisation, measured rather than guessed.

For each variant (optimisation level disabled / basic / extended / all, and int8 dynamic
quantisation of the MatMul weights with all optimisations) of a graph from
export_causal_lm, on two models:
  speed:   a random-weight PMoL Llama (width 512, 4 layers, vocab 8192; as
           benchmarks/bench_generate.py): prefill ms (8 x 64 tokens), decode ms per step
           (batch 8), and how its greedy outputs change (random weights: flat logits, so
           a pessimistic view of the changes);
  trained: the PMoL model of the built-in synthetic job (width 64, 2 layers, trained with
           DPO): how its greedy outputs on held-out prompts change.
"Changes" against the fp32 graph with all optimisations: share of sequences identical,
share of new tokens before the first difference, max relative error of the first step's
logits.

Run: .venv/bin/python experiments/ort_cpu_study.py
Writes experiments/results/ort_cpu_study.{md,json}.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import moe_ext  # noqa: E402
from moe_ext import pmol  # noqa: E402
from moe_ext.data import encode_prompts_left_padded  # noqa: E402
from moe_ext.export import OrtCausalLM, export_causal_lm  # noqa: E402
from moe_ext.utils.facts import run_facts  # noqa: E402
from moe_ext.utils.io import write_json, write_text  # noqa: E402
from moe_ext.utils.timing import time_call  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")
LEVELS = ["disabled", "basic", "extended", "all"]
GROUPS = list(pmol.SYNTHETIC_PREFERENCES)


def session_options(level: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # turns alternate
    options.graph_optimization_level = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    return options


def quantize_int8(path: str, out: str) -> str:
    """Dynamic int8 quantisation of the MatMul weights (activations quantised at run time),
    but not of the steering input's MatMul (group_bias x group membership), which must stay
    exact; the moe_ext metadata is carried over."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source = onnx.load(path)
    steering = [n.name for n in source.graph.node if "group_bias" in n.input]
    quantize_dynamic(path, out, weight_type=QuantType.QInt8, nodes_to_exclude=steering)
    quantized = onnx.load(out)
    if not any(p.key == "moe_ext.kind" for p in quantized.metadata_props):
        quantized.metadata_props.extend(source.metadata_props)
        onnx.save(quantized, out)
    return out


def variants(path: str, tmp: str, threads: int) -> dict:
    """name -> OrtCausalLM for every optimisation level and int8."""
    out = {f"fp32, {level}": OrtCausalLM(path, ["CPUExecutionProvider"], session_options(level, threads))
           for level in LEVELS}
    int8 = quantize_int8(path, os.path.join(tmp, "int8-" + os.path.basename(path)))
    out["int8 dynamic, all"] = OrtCausalLM(int8, ["CPUExecutionProvider"], session_options("all", threads))
    return out


def changes(reference: OrtCausalLM, lm: OrtCausalLM, ids, mask, new: int, steer=None) -> dict:
    """How lm's greedy output differs from the reference's on the same prompts."""
    kw = dict(max_new_tokens=new, output_logits=True, return_dict_in_generate=True, steer=steer)
    want, got = reference.generate(ids, mask, **kw), lm.generate(ids, mask, **kw)
    S = ids.shape[1]
    a, b = want.sequences[:, S:], got.sequences[:, S:]
    n = min(a.shape[1], b.shape[1])
    same = a[:, :n] == b[:, :n]
    prefix = np.where(same.all(1), n, same.argmin(1))
    first = np.abs(got.logits[0] - want.logits[0]).max() / np.abs(want.logits[0]).max()
    return {"identical": float(np.mean([a.shape == b.shape and (a[i] == b[i]).all() for i in range(len(a))])),
            "tokens_before_first_difference": float(prefix.mean() / n),
            "first_step_logits_rel_err": float(first)}


def one_at_a_time_error(reference: OrtCausalLM, lm: OrtCausalLM, ids, mask, count: int = 20) -> float:
    """Max relative error of the first step's logits with each prompt run alone (no padding,
    no other rows): int8 dynamic quantisation takes one activation scale per tensor, over
    the whole batch, so in a batch a row's result also depends on the other rows."""
    worst = 0.0
    for i in np.linspace(0, len(ids) - 1, count).astype(int):
        start = int(mask[i].argmax())
        row, row_mask = ids[i:i + 1, start:], mask[i:i + 1, start:]
        want = reference(row, row_mask).logits[:, -1]
        got = lm(row, row_mask).logits[:, -1]
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
    return worst


def speeds(lms: dict, ids, mask, new: int, reps: int) -> dict:
    """name -> prefill ms and decode ms per step: medians over reps, the variants taking
    turns within each rep so that the machine's noise falls on all of them alike."""
    calls = {name: {"prefill": lambda lm=lm: lm(ids, mask),
                    "one": lambda lm=lm: lm.generate(ids, mask, max_new_tokens=1, eos_token_id=[]),
                    "full": lambda lm=lm: lm.generate(ids, mask, max_new_tokens=new, eos_token_id=[])}
             for name, lm in lms.items()}
    times = {name: {key: [] for key in c} for name, c in calls.items()}
    for rep in range(reps + 1):  # the first round warms up
        for name, c in calls.items():
            for key, call in c.items():
                ms = time_call(call, warmup=0, reps=1)["median_ms"]
                if rep:
                    times[name][key].append(ms)
    out = {}
    for name, t in times.items():
        med = {key: float(np.median(v)) for key, v in t.items()}
        out[name] = {"prefill_ms": med["prefill"],
                     "decode_ms_per_step": (med["full"] - med["one"]) / (new - 1)}
    return out


def speed_model() -> torch.nn.Module:
    model = pmol.build_tiny_causal_lm(8192, hidden=512, layers=4, heads=8, seed=0)
    moe_ext.get_molora_model(model, pmol.pmol_config(GROUPS, 2, 1, r=8, lora_alpha=16.0, top_k=2,
                                                     target_modules="all-linear"))
    with torch.no_grad():
        for layer in moe_ext.molora_layers(model).values():
            layer.lora_B.normal_(0, 0.02)
    return model.eval()


def trained_model(steps: int):
    job = pmol.PMoLJob(steps=steps, progress=False)
    prepared = pmol.prepare_data(job)
    run = pmol.run_pmol_job(job, prepared=prepared)
    tok = prepared.tokenizer
    ids, mask = encode_prompts_left_padded(tok, [e.prompt for e in prepared.eval])
    return run.model.eval(), ids.numpy(), mask.numpy()


def study(args) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = speed_model()
        path = export_causal_lm(model, os.path.join(tmp, "speed.onnx"))
        g = np.random.default_rng(0)
        ids = g.integers(3, 8192, (8, 64))
        mask = np.ones_like(ids)
        lms = variants(path, tmp, args.threads)
        reference = lms["fp32, all"]
        timed = speeds(lms, ids, mask, args.new_tokens, args.reps)
        results["speed"] = {name: {**timed[name], **changes(reference, lm, ids, mask, args.new_tokens)}
                            for name, lm in lms.items()}
        print(results["speed"], flush=True)
        model, ids, mask = trained_model(args.steps)
        path = export_causal_lm(model, os.path.join(tmp, "trained.onnx"))
        lms = variants(path, tmp, args.threads)
        reference = lms["fp32, all"]
        results["trained"] = {name: {**changes(reference, lm, ids, mask, args.new_tokens),
                                     "one_at_a_time_rel_err": one_at_a_time_error(reference, lm, ids, mask)}
                              for name, lm in lms.items()}
        results["trained_steered"] = {name: changes(reference, lm, ids, mask, args.new_tokens,
                                                    steer={"verbose": 2.0})
                                      for name, lm in lms.items()}
        results["trained_prompts"] = int(ids.shape[0])
    return results


def markdown(results: dict, facts: dict, args) -> str:
    base = results["speed"]["fp32, all"]
    lines = ["# onnxruntime on the CPU: graph optimisations and int8 dynamic quantisation", "",
             f"Machine: {facts['cpu']}, {facts['cores']} cores ({args.threads} onnxruntime threads), "
             f"torch {facts['torch']}, onnxruntime {facts['onnxruntime']}. Commit {facts['commit']}, "
             f"{facts['date']}, {facts['seconds']} s in all.  ",
             "Command: `.venv/bin/python experiments/ort_cpu_study.py`", "",
             "Graphs from `export_causal_lm` (fp32). Speed model: random-weight PMoL Llama, width "
             "512, 4 layers, 8 heads, vocab 8192, 3 groups x 2 LoRA experts + 1 null, top-2, r=8 on "
             f"every linear layer; prefill of 8 x 64 tokens, decode at batch 8, medians of {args.reps} "
             f"runs, the variants taking turns. Changes: greedy, {args.new_tokens} new tokens, against `fp32, all` (the default).", "",
             "## Speed model", "",
             "| variant | prefill ms | decode ms/step | decode speed-up | identical sequences | "
             "tokens before first difference | first-step logits rel. error |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results["speed"].items():
        lines.append(f"| {name} | {r['prefill_ms']:.1f} | {r['decode_ms_per_step']:.2f} | "
                     f"{base['decode_ms_per_step'] / r['decode_ms_per_step']:.2f}x | "
                     f"{r['identical']:.2f} | {r['tokens_before_first_difference']:.2f} | "
                     f"{r['first_step_logits_rel_err']:.1e} |")
    lines += ["", f"## Trained PMoL model (synthetic job, {args.steps} steps; "
                  f"{results['trained_prompts']} held-out prompts, EOS on)", "",
              "Plain, and steered with `steer={\"verbose\": 2.0}` (against the steered reference).", "",
              "| variant | steering | identical sequences | tokens before first difference | "
              "first-step logits rel. error (max over the batch) |", "|---|---|---|---|---|"]
    for key, label in (("trained", "none"), ("trained_steered", "verbose +2")):
        for name, r in results[key].items():
            lines.append(f"| {name} | {label} | {r['identical']:.2f} | "
                         f"{r['tokens_before_first_difference']:.2f} | {r['first_step_logits_rel_err']:.1e} |")
    lines += ["", "First-step logits error with 20 of the prompts run one at a time (batch 1, no "
              "padding): " + ", ".join(f"{name} {r['one_at_a_time_rel_err']:.1e}"
                                       for name, r in results["trained"].items()) + ". Dynamic int8 "
              "quantisation takes one activation scale per tensor over the whole batch, so in a "
              "batch a row's result also depends on the other rows (and on their padding).", ""]
    lines.append("")
    return "\n".join(lines)


def main(argv=None):
    import onnxruntime

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=150, help="PMoL training steps")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    results = study(args)
    facts = {**run_facts(), "onnxruntime": onnxruntime.__version__,
             "seconds": round(time.time() - t0, 1), "args": vars(args)}
    write_json(os.path.join(args.out, "ort_cpu_study.json"), {"facts": facts, "results": results}, indent=1)
    text = markdown(results, facts, args)
    write_text(os.path.join(args.out, "ort_cpu_study.md"), text)
    print(text)


if __name__ == "__main__":
    main()
