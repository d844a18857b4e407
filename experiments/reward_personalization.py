"""The controlled experiment for the sparse MoE reward model (arXiv 2606.04284 on moe_ext):
synthetic data with known latent preference criteria, category recovery by the router,
pairwise accuracy, per-user accuracy after adaptation with few pairs against baselines,
and ablations of each regularizer.

Run: .venv/bin/python experiments/reward_personalization.py
Writes experiments/results/reward_personalization.{md,json} and three PNG plots.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from moe_ext import reward  # noqa: E402
from moe_ext.reward import synthetic as rd  # noqa: E402
from moe_ext.utils import plots as P  # noqa: E402
from moe_ext.utils.facts import run_facts  # noqa: E402
from moe_ext.utils.io import write_json, write_text  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")
PAIRS = [4, 8, 16, 32, 64]
VARIANTS = {  # name: (top_k, FitConfig overrides)
    "sparse MoE": (1, {}),
    "dense MoE (MiCRo-like)": (None, dict(sparsity_coef=0.0, balance_coef=0.0, diversity_coef=0.0)),
    "ablation: no sparsity": (1, dict(sparsity_coef=0.0)),
    "ablation: no balance": (1, dict(balance_coef=0.0)),
    "ablation: no diversity": (1, dict(diversity_coef=0.0)),
    "ablation: no regularizer": (1, dict(sparsity_coef=0.0, balance_coef=0.0, diversity_coef=0.0)),
}


def finetune_universal(universal, pairs, steps=50, lr=0.01):
    """Baseline that also adapts: the universal head fine-tuned on the user's pairs."""
    model = copy.deepcopy(universal)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = -torch.nn.functional.logsigmoid(model(None, pairs.chosen) - model(None, pairs.rejected)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def run_seed(seed, args):
    task = rd.make_task(num_criteria=args.criteria, seed=seed)
    train = rd.category_pairs(task, args.train_pairs, seed=seed * 10 + 1)
    test = rd.category_pairs(task, 2000, seed=seed * 10 + 2)
    profiles = rd.sample_users(task, args.users, seed=seed * 10 + 3)
    user_test = [rd.user_pairs(task, p, 500, seed=seed * 1000 + 500 + i, user_id=i)
                 for i, p in enumerate(profiles)]
    user_few = {n: [rd.user_pairs(task, p, n, seed=seed * 1000 + n * 7 + i, user_id=i)
                    for i, p in enumerate(profiles)] for n in PAIRS}
    out = {"seed": seed, "models": {}}
    torch.manual_seed(seed)
    universal = reward.UniversalRewardModel(task.criteria.shape[1])
    reward.fit(universal, train.prompt, train.chosen, train.rejected, epochs=args.epochs,
               progress=False)
    out["models"]["universal BT"] = {
        "category_accuracy": reward.pairwise_accuracy(universal, test.prompt, test.chosen, test.rejected),
        "user_accuracy": {"none": {n: mean([reward.pairwise_accuracy(universal, t.prompt, t.chosen, t.rejected)
                                            for t in user_test]) for n in PAIRS},
                          "finetune": {n: mean([reward.pairwise_accuracy(
                              finetune_universal(universal, f), t.prompt, t.chosen, t.rejected)
                              for f, t in zip(user_few[n], user_test)]) for n in PAIRS}}}
    out["oracle"] = mean([rd.oracle_accuracy(task, p, t) for p, t in zip(profiles, user_test)])
    for name, (top_k, overrides) in VARIANTS.items():
        if name.startswith("ablation") and seed not in args.ablation_seeds:
            continue
        torch.manual_seed(seed)
        E = task.num_criteria
        model = reward.SparseMoERewardModel(test.prompt.shape[1], task.criteria.shape[1], E,
                                            top_k or E)
        reward.fit(model, train.prompt, train.chosen, train.rejected, epochs=args.epochs,
                   progress=False, **overrides)
        routed = model.route(test.prompt).argmax(-1)
        purity, nmi = reward.purity_nmi(routed, test.label)
        row = {"purity": purity, "nmi": nmi,
               "category_accuracy": reward.pairwise_accuracy(model, test.prompt, test.chosen,
                                                             test.rejected),
               "user_accuracy": {}}
        methods = ("gradient", "hedge", "hyre") if not name.startswith("ablation") else ("gradient",)
        for method in methods:
            row["user_accuracy"][method] = {}
            for n in PAIRS if not name.startswith("ablation") else [16]:
                accs, weights = [], []
                for f, t in zip(user_few[n], user_test):
                    w = reward.adapt(model, f.prompt, f.chosen, f.rejected, method=method)
                    weights.append(w)
                    accs.append(reward.pairwise_accuracy(model, t.prompt, t.chosen, t.rejected, w))
                row["user_accuracy"][method][n] = mean(accs)
                if name == "sparse MoE" and method == "gradient" and n == max(PAIRS) and seed == 0:
                    prior = reward.average_routing(model, test.prompt)
                    out["plots"] = {
                        "routing": [model.route(test.prompt[test.label == c]).mean(0).tolist()
                                    for c in range(E)],
                        "shifts": [(w - prior).tolist() for w in weights],
                        "profiles": profiles.tolist(),
                        # expert that category c (criterion c) routes to most
                        "criterion_expert": [int(model.route(test.prompt[test.label == c]).mean(0).argmax())
                                             for c in range(E)]}
        out["models"][name] = row
    return out


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ablation-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--criteria", type=int, default=6)
    parser.add_argument("--train-pairs", type=int, default=6000)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # these tiny models run faster on one thread of a shared machine
    t0 = time.time()
    runs = []
    for seed in args.seeds:
        runs.append(run_seed(seed, args))
        print(f"seed {seed} done ({time.time() - t0:.0f} s)", flush=True)
    facts = {**run_facts(), "seconds": round(time.time() - t0, 1), "args": vars(args)}
    write_json(os.path.join(args.out, "reward_personalization.json"), {"facts": facts, "runs": runs},
               indent=None)
    text = markdown(runs, facts, args)
    write_text(os.path.join(args.out, "reward_personalization.md"), text)
    plots(runs, args.out)
    print(text)


def avg(runs, *path):
    vals = []
    for r in runs:
        node = r
        try:
            for p in path:
                node = node[p]
        except KeyError:
            continue
        vals.append(node)
    return mean(vals) if vals else float("nan")


def markdown(runs, facts, args) -> str:
    seeds = [r["seed"] for r in runs]
    L = ["# Sparse MoE reward model: personalised preferences on synthetic data", "",
         f"Machine: {facts['cpu']}, {facts['cores']} cores, torch {facts['torch']}. "
             f"Commit {facts['commit']}, {facts['date']}, "
         f"{facts['seconds']} s in all.  ",
         "Command: `.venv/bin/python experiments/reward_personalization.py`", "",
         f"Data: {args.criteria} latent criteria (orthogonal directions in a 32-d response "
         f"embedding), {args.criteria} prompt categories (clusters in a 16-d prompt "
         "embedding), category c judged by criterion c; labels Bradley-Terry with temperature "
         f"0.1. {args.train_pairs} training and 2000 test pairs of category data. "
         f"{args.users} users per seed, each judging by a random mix of 2 criteria; each user's "
         "accuracy on 500 held-out pairs after adapting on n labelled pairs. "
         f"Models: E={args.criteria} linear expert heads; sparse MoE top-1 with sparsity 0.05, "
         "balance 0.1, diversity 0.05; dense MoE = all experts, softmax weights, no "
         f"regularizer; {args.epochs} epochs, Adam lr 1e-2. Means over seeds {seeds}.", "",
         "## Category data", "",
         "| model | router purity | router NMI | pairwise accuracy |", "|---|---|---|---|"]
    for name in ["sparse MoE", "dense MoE (MiCRo-like)"]:
        L.append(f"| {name} | {avg(runs, 'models', name, 'purity'):.3f} | "
                 f"{avg(runs, 'models', name, 'nmi'):.3f} | "
                 f"{avg(runs, 'models', name, 'category_accuracy'):.3f} |")
    L.append(f"| universal BT | - | - | {avg(runs, 'models', 'universal BT', 'category_accuracy'):.3f} |")
    L += ["", "## Per-user accuracy after adaptation with n pairs", "",
          "| model / adaptation | " + " | ".join(f"n={n}" for n in PAIRS) + " |",
          "|---|" + "---|" * len(PAIRS)]
    rows = [("sparse MoE, gradient on routing logits", ("sparse MoE", "gradient")),
            ("sparse MoE, Hedge", ("sparse MoE", "hedge")),
            ("sparse MoE, HyRe", ("sparse MoE", "hyre")),
            ("dense MoE, gradient", ("dense MoE (MiCRo-like)", "gradient")),
            ("dense MoE, Hedge", ("dense MoE (MiCRo-like)", "hedge")),
            ("dense MoE, HyRe", ("dense MoE (MiCRo-like)", "hyre")),
            ("universal BT, no adaptation", ("universal BT", "none")),
            ("universal BT, fine-tuned on the n pairs", ("universal BT", "finetune"))]
    for label, (name, method) in rows:
        L.append(f"| {label} | " + " | ".join(
            f"{avg(runs, 'models', name, 'user_accuracy', method, n):.3f}" for n in PAIRS) + " |")
    L.append("| oracle (true criteria and profile) | " + " | ".join(
        f"{avg(runs, 'oracle'):.3f}" for _ in PAIRS) + " |")
    gain = (avg(runs, "models", "sparse MoE", "user_accuracy", "gradient", 16)
            - avg(runs, "models", "universal BT", "user_accuracy", "none", 16))
    L += ["", f"Gain of the sparse MoE (gradient) over the universal BT at 16 pairs: "
              f"{100 * gain:+.1f} points.", "", "## Ablations (sparse MoE, one regularizer off)", "",
          "| variant | purity | NMI | category accuracy | user accuracy, 16 pairs (gradient) |",
          "|---|---|---|---|---|"]
    for name in ["sparse MoE"] + [k for k in VARIANTS if k.startswith("ablation")]:
        L.append(f"| {name} | {avg(runs, 'models', name, 'purity'):.3f} | "
                 f"{avg(runs, 'models', name, 'nmi'):.3f} | "
                 f"{avg(runs, 'models', name, 'category_accuracy'):.3f} | "
                 f"{avg(runs, 'models', name, 'user_accuracy', 'gradient', 16):.3f} |")
    L += ["", "Plots: `reward_routing_heatmap.png` (mean routing by category), "
          "`reward_user_shifts.png` (true profiles next to the adapted weight shifts), "
          "`reward_accuracy_vs_pairs.png`.", ""]
    return "\n".join(L)


def plots(runs, out):
    pl = runs[0]["plots"]
    P.routing_heatmap(pl["routing"], os.path.join(out, "reward_routing_heatmap.png"),
                      "Mean routing probability (sparse MoE, seed 0)")
    profiles = torch.tensor(pl["profiles"])
    true_by_expert = torch.zeros_like(profiles)
    for c, e in enumerate(pl["criterion_expert"]):  # criterion c -> the expert its category uses
        true_by_expert[:, e] += profiles[:, c]
    P.user_shift_heatmap(true_by_expert, pl["shifts"], os.path.join(out, "reward_user_shifts.png"),
                         max(PAIRS), method="sparse MoE, gradient")
    series = {label: (PAIRS, [avg(runs, "models", name, "user_accuracy", method, n) for n in PAIRS])
              for label, name, method in [
                  ("sparse MoE, gradient", "sparse MoE", "gradient"),
                  ("sparse MoE, Hedge", "sparse MoE", "hedge"),
                  ("sparse MoE, HyRe", "sparse MoE", "hyre"),
                  ("dense MoE, gradient", "dense MoE (MiCRo-like)", "gradient"),
                  ("universal BT", "universal BT", "none"),
                  ("universal BT fine-tuned", "universal BT", "finetune")]}
    P.curves(series, os.path.join(out, "reward_accuracy_vs_pairs.png"),
             "labelled pairs from the user", "held-out pairwise accuracy", logx=True,
             hline=(avg(runs, "oracle"), "oracle"))


if __name__ == "__main__":
    main()
