"""`moe-ext demo`: the main job end to end, offline, on built-in data.

1. Sparse MoE reward model on synthetic personalised preferences; adapt it to a few users
   from 16 labelled pairs each and show their expert-weight shifts.
2. A PMoL adapter (3 preference groups x 2 LoRA experts + a null expert) on a tiny
   Llama-style LM, trained with DPO on the built-in multi-preference data.
3. Both exported to ONNX, run on onnxruntime, parity and latency against PyTorch;
   the LM as a generation graph (KV cache, steering input), generating as PyTorch does.
4. A summary table, plots and a report in the output folder.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from . import pmol, reward
from .data import encode_prompts_left_padded
from .info import build_info
from .reward import synthetic as rd
from .utils import plots
from .utils.io import write_json, write_text
from .utils.timing import time_call


@dataclass
class DemoSize:
    rm_pairs: int
    rm_epochs: int
    users: int
    pmol_per_preference: int
    pmol_steps: int


FULL = DemoSize(rm_pairs=6000, rm_epochs=40, users=20, pmol_per_preference=300, pmol_steps=150)
QUICK = DemoSize(rm_pairs=2000, rm_epochs=15, users=8, pmol_per_preference=100, pmol_steps=50)
ADAPT_PAIRS = 16


def _median_ms(fn) -> float:
    return time_call(fn, warmup=1, reps=20)["median_ms"]


def _rel_err(got, want) -> float:
    want = want.detach().float().numpy()
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


def reward_part(size: DemoSize, out: str, progress: bool, log) -> tuple[dict, reward.SparseMoERewardModel]:
    task = rd.make_task(seed=0)
    train, test = (reward.RewardData(p.prompt, p.chosen, p.rejected, p.label)
                   for p in (rd.category_pairs(task, size.rm_pairs, seed=1),
                             rd.category_pairs(task, 2000, seed=2)))
    log("reward model: training the sparse MoE on category data")
    run = reward.train_reward_job(reward.RewardJob(experts=task.num_criteria, top_k=1,
                                                   epochs=size.rm_epochs, progress=progress),
                                  data=train, test=test)
    model, history = run.model, run.history
    universal = reward.UniversalRewardModel(32)
    reward.fit(universal, train.prompt, train.chosen, train.rejected, epochs=size.rm_epochs,
               progress=False)
    profiles = rd.sample_users(task, size.users, seed=3)
    prior = reward.average_routing(model, test.prompt)
    adapted, universal_acc, oracle, shifts = [], [], [], []
    log(f"reward model: adapting to {size.users} users from {ADAPT_PAIRS} pairs each")
    for i, profile in enumerate(profiles):
        few = rd.user_pairs(task, profile, ADAPT_PAIRS, seed=100 + i)
        held = rd.user_pairs(task, profile, 500, seed=1000 + i)
        w = reward.adapt(model, few.prompt, few.chosen, few.rejected, method="gradient")
        shifts.append((w - prior).tolist())
        adapted.append(reward.pairwise_accuracy(model, held.prompt, held.chosen, held.rejected, w))
        universal_acc.append(reward.pairwise_accuracy(universal, held.prompt, held.chosen, held.rejected))
        oracle.append(rd.oracle_accuracy(task, profile, held))
    routing = [model.route(test.prompt[test.label == c]).mean(0).tolist() for c in range(task.num_criteria)]
    expert_of = [int(torch.tensor(r).argmax()) for r in routing]
    true_by_expert = torch.zeros_like(profiles)
    for c, e in enumerate(expert_of):
        true_by_expert[:, e] += profiles[:, c]
    plots.routing_heatmap(routing, os.path.join(out, "reward_routing_heatmap.png"),
                          "Reward model: mean routing by category")
    plots.user_shift_heatmap(true_by_expert, shifts, os.path.join(out, "reward_user_shifts.png"),
                             ADAPT_PAIRS)
    result = {"category_accuracy": run.metrics["test_accuracy"],
              "universal_category_accuracy": reward.pairwise_accuracy(universal, test.prompt, test.chosen, test.rejected),
              "router_purity": run.metrics["router_purity"], "router_nmi": run.metrics["router_nmi"],
              "user_accuracy_adapted": float(np.mean(adapted)),
              "user_accuracy_universal": float(np.mean(universal_acc)),
              "user_accuracy_oracle": float(np.mean(oracle)),
              "fit_history": history}
    result["personalization_gain"] = result["user_accuracy_adapted"] - result["user_accuracy_universal"]
    return result, model


def pmol_part(size: DemoSize, out: str, progress: bool, log):
    tok = pmol.synthetic_tokenizer()
    train = pmol.synthetic_preference_data(size.pmol_per_preference, seed=100)
    test = pmol.synthetic_preference_data(60, seed=200)
    prepared = pmol.PMoLData(train, test, tok, sorted(pmol.SYNTHETIC_PREFERENCES))
    result = pmol.run_pmol_job(pmol.PMoLJob(steps=size.pmol_steps, progress=progress),
                               prepared=prepared, log=log)
    report = result.metrics["eval"]
    model = result.model
    steps = [h["step"] for h in result.history]
    plots.curves({"DPO loss": (steps, [h["loss"] for h in result.history]),
                  "batch DPO accuracy": (steps, [h["dpo_acc"] for h in result.history]),
                  "group loss": (steps, [h["group"] for h in result.history])},
                 os.path.join(out, "pmol_training_curves.png"), "step", "value",
                 "PMoL training on the synthetic preferences")
    return {"eval": report, "history": result.history}, model, tok


def export_part(rm_model, lm_model, tok, out: str, log) -> dict:
    from .export import OrtCausalLM, OrtModel, export_causal_lm, to_onnx  # optional extras

    log("ONNX: exporting both models and running them on onnxruntime")
    results = {}
    g = torch.Generator().manual_seed(7)
    p, r = torch.randn(64, 16, generator=g), torch.randn(64, 32, generator=g)
    path = to_onnx(rm_model, os.path.join(out, "reward_model.onnx"),
                   {"prompt_emb": p[:2], "response_emb": r[:2]})
    ort_rm = OrtModel(path)
    with torch.no_grad():
        want = rm_model(p, r)
    results["reward_model"] = {
        "path": path, "providers": ort_rm.providers,
        "max_rel_err": _rel_err(ort_rm(prompt_emb=p, response_emb=r)["rewards"], want),
        "ort_ms": _median_ms(lambda: ort_rm(prompt_emb=p, response_emb=r)),
        "torch_ms": _median_ms(lambda: rm_model(p, r))}
    ids = torch.randint(0, len(tok), (4, 12), generator=g)
    mask = torch.ones_like(ids)
    lm_model.eval()
    path = export_causal_lm(lm_model, os.path.join(out, "pmol_lm.onnx"), logits="all")
    ort_lm = OrtCausalLM(path)
    with torch.no_grad():
        want = lm_model(input_ids=ids, attention_mask=mask).logits

        def torch_lm():
            with torch.no_grad():
                lm_model(input_ids=ids, attention_mask=mask)
    results["pmol_lm"] = {
        "path": path, "providers": ort_lm.providers,
        "max_rel_err": _rel_err(ort_lm(ids, mask).logits, want),
        "ort_ms": _median_ms(lambda: ort_lm(ids, mask)), "torch_ms": _median_ms(torch_lm),
        "generation": _generation_check(lm_model, ort_lm, tok)}
    return results


def _generation_check(lm_model, ort_lm, tok, new_tokens: int = 16) -> dict:
    """Greedy generation with the KV cache on onnxruntime against transformers' generate,
    on held-out prompts (left padded), plain and steered toward "verbose"."""
    ids, mask = encode_prompts_left_padded(
        tok, [e.prompt for e in pmol.synthetic_preference_data(2, seed=300)])
    same = []
    for steer in (None, {"verbose": 2.0}):
        pmol.set_group_bias(lm_model, steer)
        try:
            with torch.no_grad():
                want = lm_model.generate(input_ids=ids, attention_mask=mask,
                                         max_new_tokens=new_tokens, do_sample=False,
                                         pad_token_id=tok.pad_token_id)
        finally:
            pmol.set_group_bias(lm_model, None)
        got = ort_lm.generate(ids, mask, max_new_tokens=new_tokens, steer=steer)
        same.append(bool(torch.equal(got, want)))
    return {"identical": all(same), "prompts": len(ids), "new_tokens": new_tokens}


def run_demo(output: str = "out/demo", quick: bool = False, progress: bool = True,
             log=print) -> dict:
    """Runs the whole demo; returns the summary (also written to output/summary.json)."""
    size = QUICK if quick else FULL
    os.makedirs(output, exist_ok=True)
    t0 = time.time()
    torch.manual_seed(0)
    rm_result, rm_model = reward_part(size, output, progress, log)
    pmol_result, lm_model, tok = pmol_part(size, output, progress, log)
    export = export_part(rm_model, lm_model, tok, output, log)
    info = build_info()
    summary = {
        "quick": quick, "seconds": round(time.time() - t0, 1),
        "kernels": {"device": "cuda" if torch.cuda.is_available() else "cpu",
                    "cpu_kernels": info["cpu_kernels"], "cuda_kernels": info["cuda_kernels"],
                    "cpu_capability": info["cpu_capability"]},
        "reward": {k: v for k, v in rm_result.items() if k != "fit_history"},
        "pmol": pmol_result["eval"], "onnx": export}
    plots.curves({"sparse MoE BT loss": ([h["epoch"] for h in rm_result["fit_history"]],
                                         [h["bt"] for h in rm_result["fit_history"]])},
                 os.path.join(output, "reward_training_curve.png"), "epoch", "Bradley-Terry loss",
                 "Reward model training")
    write_json(os.path.join(output, "summary.json"), summary)
    write_text(os.path.join(output, "report.md"), report(summary, summary_table(summary)))
    return summary


def summary_table(s: dict) -> str:
    r, p, o = s["reward"], s["pmol"], s["onnx"]
    rows = [
        ("reward model: category pairwise accuracy", f"{r['category_accuracy']:.3f} "
         f"(universal BT {r['universal_category_accuracy']:.3f})"),
        ("reward model: router purity / NMI", f"{r['router_purity']:.3f} / {r['router_nmi']:.3f}"),
        (f"personalisation: user accuracy, {ADAPT_PAIRS} pairs", f"{r['user_accuracy_adapted']:.3f} "
         f"(universal {r['user_accuracy_universal']:.3f}, oracle {r['user_accuracy_oracle']:.3f})"),
        ("personalisation gain", f"{100 * r['personalization_gain']:+.1f} points"),
        ("PMoL: held-out DPO accuracy", f"{p['all']['dpo_accuracy']:.3f} ("
         + ", ".join(f"{k} {v['dpo_accuracy']:.2f}" for k, v in p.items() if k != "all") + ")"),
        ("PMoL: group routing accuracy", f"{p['all']['routing_accuracy']:.3f}"),
    ]
    for name, label in (("reward_model", "reward model"), ("pmol_lm", "PMoL LM")):
        e = o[name]
        rows.append((f"ONNX {label}: max rel. error vs PyTorch", f"{e['max_rel_err']:.1e}"))
        rows.append((f"ONNX {label}: latency ORT / PyTorch", f"{e['ort_ms']:.3f} ms / "
                     f"{e['torch_ms']:.3f} ms on {e['providers'][0]}"))
    gen = o["pmol_lm"]["generation"]
    rows.append(("ONNX PMoL LM: greedy generation = PyTorch", f"{'yes' if gen['identical'] else 'NO'} "
                 f"({gen['prompts']} prompts x {gen['new_tokens']} tokens, KV cache; plain and steered)"))
    k = s["kernels"]
    if k["device"] == "cuda":
        ran = "CUDA kernels" if k["cuda_kernels"] else "PyTorch fallbacks on the GPU"
    else:
        ran = f"CPU ({k['cpu_capability']} C++ kernels)"
    rows.append(("kernels that ran", ran))
    rows.append(("CUDA kernels built", ", ".join(k["cuda_kernels"]) or "none"))
    rows.append(("wall time", f"{s['seconds']} s{' (quick)' if s['quick'] else ''}"))
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)


def report(summary: dict, table: str) -> str:
    return "\n".join([
        "# moe_ext demo report", "",
        "```", table, "```", "",
        "Plots: `reward_routing_heatmap.png`, `reward_user_shifts.png`, "
        "`reward_training_curve.png`, `pmol_training_curves.png`.  ",
        "Models: `reward_model.onnx`, `pmol_lm.onnx`. All numbers: `summary.json`.", ""])
