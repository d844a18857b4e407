"""PMoL on the built-in synthetic multi-preference data, against a single LoRA with the same
number of LoRA parameters trained on the same mixed data (the baseline PMoL claims to beat).

Measures, on held-out examples: (1) group routing accuracy, (2) DPO preference accuracy per
preference (implicit reward of chosen > rejected), (3) the effect of steering (a logit bias
on one group's experts), for several training lengths and seeds.

Run: .venv/bin/python experiments/pmol_synthetic.py
Writes experiments/results/pmol_synthetic.{md,json,png}.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import moe_ext  # noqa: E402
from moe_ext import pmol  # noqa: E402
from moe_ext.training import TrainConfig  # noqa: E402
from moe_ext.utils.facts import run_facts  # noqa: E402
from moe_ext.utils.io import write_json, write_text  # noqa: E402
from moe_ext.utils.plots import curves  # noqa: E402

GROUPS = list(pmol.SYNTHETIC_PREFERENCES)
RESULTS = os.path.join(os.path.dirname(__file__), "results")


def lora_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)


def build(kind: str, tok, seed: int, rank: int):
    base = pmol.build_tiny_causal_lm(len(tok), seed=seed)
    if kind == "pmol":
        cfg = pmol.pmol_config(GROUPS, experts_per_group=2, num_null_experts=1, r=rank,
                               lora_alpha=2 * rank, top_k=2, target_modules="all-linear",
                               group_loss_coef=0.5)
    else:  # one LoRA with the experts' total rank: the same number of A and B parameters
        cfg = moe_ext.MoLoRAConfig(r=6 * rank, lora_alpha=2 * 6 * rank, num_experts=1, top_k=1,
                                   target_modules="all-linear")
    return moe_ext.get_molora_model(base, cfg)


def steering_effect(model, test, tok, beta) -> dict:
    """DPO accuracy on verbose prompts (long preferred) and concise prompts (short preferred)
    as the router is pushed toward the other group."""
    verbose = [e for e in test if e.preference == "verbose"]
    concise = [e for e in test if e.preference == "concise"]
    rows = {}
    for bias in (0.0, 2.0, 5.0):
        moe_ext.set_group_bias(model, {"concise": bias})
        v = pmol.evaluate_pmol(model, verbose, tok, beta)["verbose"]["dpo_accuracy"]
        moe_ext.set_group_bias(model, {"verbose": bias})
        c = pmol.evaluate_pmol(model, concise, tok, beta)["concise"]["dpo_accuracy"]
        rows[str(bias)] = {"verbose_acc_steered_to_concise": v, "concise_acc_steered_to_verbose": c}
    moe_ext.set_group_bias(model, None)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 40, 80, 160])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    tok = pmol.synthetic_tokenizer()
    train = pmol.synthetic_preference_data(300, seed=100)
    test = pmol.synthetic_preference_data(100, seed=200)
    runs = []
    t0 = time.time()
    for seed in args.seeds:
        for steps in args.steps:
            for kind in ("pmol", "lora"):
                model = build(kind, tok, seed, args.rank)
                pmol.train_pmol(model, train, tok,
                                TrainConfig(steps=steps, lr=3e-3, seed=seed, progress=False),
                                pmol.DPOConfig(beta=args.beta), batch_size=16)
                report = pmol.evaluate_pmol(model, test, tok, args.beta)
                row = {"kind": kind, "seed": seed, "steps": steps, "params": lora_params(model),
                       "eval": report}
                if kind == "pmol" and steps == max(args.steps):
                    row["steering"] = steering_effect(model, test, tok, args.beta)
                runs.append(row)
                print(f"seed {seed} steps {steps:4d} {kind:5s} DPO acc "
                      f"{report['all']['dpo_accuracy']:.3f}", flush=True)
    facts = {**run_facts(), "seconds": round(time.time() - t0, 1), "args": vars(args)}
    write_json(os.path.join(args.out, "pmol_synthetic.json"), {"facts": facts, "runs": runs}, indent=1)
    write_text(os.path.join(args.out, "pmol_synthetic.md"), markdown(runs, facts, args))
    plot(runs, args, os.path.join(args.out, "pmol_synthetic.png"))


def mean(xs):
    return sum(xs) / len(xs)


def markdown(runs, facts, args) -> str:
    lines = ["# PMoL vs a single LoRA on the synthetic multi-preference data", "",
             f"Machine: {facts['cpu']}, {facts['cores']} cores, torch {facts['torch']}. "
             f"Commit {facts['commit']}, {facts['date']}, "
             f"{facts['seconds']} s in all.  ",
             "Command: `.venv/bin/python experiments/pmol_synthetic.py`", "",
             "Data: three conflicting preferences (concise prefers a 2-word answer, verbose the "
             "6-word one, safe a refusal); prompts carry a marker word of their preference. "
             "900 training and 300 held-out examples. Base: a 2-layer Llama-style LM (width 64), "
             "frozen. PMoL: 3 groups x 2 experts + 1 null expert, r=4, top-2, group loss 0.5, "
             "load balance 0.01. LoRA: one expert of rank 24 (the same A/B parameter count; "
             "PMoL adds the routers). Both: DPO beta=0.5, AdamW lr 3e-3, batch 16. "
             f"Means over seeds {args.seeds}.", "",
             "## Held-out DPO preference accuracy", "",
             "| steps | model | trainable params | concise | verbose | safe | all | group routing acc |",
             "|---|---|---|---|---|---|---|---|"]
    for steps in args.steps:
        for kind in ("pmol", "lora"):
            rs = [r for r in runs if r["steps"] == steps and r["kind"] == kind]
            acc = {p: mean([r["eval"][p]["dpo_accuracy"] for r in rs]) for p in GROUPS + ["all"]}
            route = (f"{mean([r['eval']['all']['routing_accuracy'] for r in rs]):.3f}"
                     if kind == "pmol" else "-")
            lines.append(f"| {steps} | {kind} | {rs[0]['params']} | {acc['concise']:.3f} | "
                         f"{acc['verbose']:.3f} | {acc['safe']:.3f} | {acc['all']:.3f} | {route} |")
    lines += ["", f"## Steering (PMoL after {max(args.steps)} steps)", "",
              "A logit bias on one group's experts in every layer. Accuracy of the verbose "
              "prompts' own preference while steering toward concise, and the reverse; a drop "
              "means the steered group's behaviour took over.", "",
              "| bias | verbose prompts, steered to concise | concise prompts, steered to verbose |",
              "|---|---|---|"]
    steered = [r["steering"] for r in runs if "steering" in r]
    for bias in steered[0]:
        v = mean([s[bias]["verbose_acc_steered_to_concise"] for s in steered])
        c = mean([s[bias]["concise_acc_steered_to_verbose"] for s in steered])
        lines.append(f"| {bias} | {v:.3f} | {c:.3f} |")
    lines.append("")
    return "\n".join(lines)


def plot(runs, args, path):
    labels = {"pmol": "PMoL (3 groups x 2 experts + null)", "lora": "single LoRA, same A/B params"}
    series = {labels[kind]: (args.steps, [mean([r["eval"]["all"]["dpo_accuracy"] for r in runs
                                                if r["steps"] == s and r["kind"] == kind])
                                          for s in args.steps]) for kind in ("pmol", "lora")}
    curves(series, path, "training steps", "held-out DPO preference accuracy",
           "Synthetic conflicting preferences", logx=True)


if __name__ == "__main__":
    main()
