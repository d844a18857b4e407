"""Tables (markdown) and plots of experiments/reward_population.py, from its runs."""
from __future__ import annotations

import os
import statistics

import numpy as np

from moe_ext.utils import plots as P

CELLS = ["seen/seen_prompts", "seen/unseen_prompts", "unseen/seen_prompts", "unseen/unseen_prompts"]
CELL_NAMES = ["seen users, seen prompts", "seen users, unseen prompts",
              "unseen users, seen prompts", "unseen users, unseen prompts"]
METHODS = ["hedge", "hyre", "gradient"]
TARGET = "unseen/unseen_prompts"


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def methods_of(runs, name):
    return ["hyre"] if name == "universal BT" else METHODS  # one head: all methods agree


def at(shots: dict, n: int):
    """The entry for n shots (int keys in a run, str keys once read back from JSON)."""
    return shots.get(n, shots.get(str(n)))


def cell(runs, name, method, where, n):
    """(mean over seeds, mean over seeds of the std over resamples, std over seeds) or None."""
    rows = [at(r["models"][name]["adapted"][method].get(where, {}), n) for r in runs
            if name in r["models"]]
    rows = [x for x in rows if x is not None]
    if not rows:
        return None
    means = [x["mean"] for x in rows]
    return mean(means), mean(x["std"] for x in rows), (statistics.pstdev(means) if len(means) > 1 else 0.0)


def fmt(value):
    return "-" if value is None else f"{value[0]:.3f} ± {value[1]:.3f}"


def global_acc(runs, name, kind="unseen_prompts"):
    return mean(r["models"][name]["global"][kind] for r in runs if name in r["models"])


def label(name, method):
    return name if name == "universal BT" else f"{name}, {method}"


def best(runs, name, n=10):
    """(method, value) of the model's best adaptation at n on unseen users x unseen prompts."""
    scored = [(m, cell(runs, name, m, TARGET, n)) for m in methods_of(runs, name)]
    scored = [(m, v) for m, v in scored if v is not None]
    return max(scored, key=lambda mv: mv[1][0])


def markdown(runs, sens, facts, args) -> str:
    names = [n for n in runs[0]["models"] if not n.startswith("ablation")]
    ablations = [n for n in runs[0]["models"] if n.startswith("ablation")]
    users = runs[0]["models"]["universal BT"]["users"]
    L = ["# Sparse MoE reward model on a PersonalLLM-style population", "",
         f"Machine: {facts['cpu']}, {facts['cores']} cores (1 torch thread), torch "
         f"{facts['torch']}. Commit {facts['commit']}, {facts['date']}, "
         f"{facts['seconds'] / 60:.0f} min in all.  ",
         "Command: `.venv/bin/python experiments/reward_population.py`"
         + (" --quick" if args.quick else ""), "",
         "## Set-up", "",
         f"Population (`moe_ext.reward.population`, seeds {args.seeds}): 12,500 prompts (20% "
         "unseen) with 8 candidate responses each, scored by 10 base reward functions over "
         f"synthetic features; users are Dirichlet({args.alpha}) mixtures of the base rewards "
         f"(shared-quality cosine {args.shared_quality}: the base rewards are uncorrelated); "
         "a user's pair on a prompt is (argmax, argmin) of their score. 1000 seen users label "
         "0.5% of the seen prompts each (50,000 training pairs, no user ids but for the models "
         "that say so); 500 unseen users bring 100 pairs on seen prompts each, from which the "
         f"adaptation sets are drawn. Evaluated: {users['seen']} seen and {users['unseen']} "
         "unseen users, 50 held-out pairs each on seen and on unseen prompts, accuracy "
         "macro-averaged per user; few-shot: 20 resampled adaptation sets per user and n "
         "(seen users draw from their 50 training pairs, so n = 50 is one set).", "",
         f"Models ({args.epochs} epochs, Adam lr 1e-2, batch 256; E = {args.experts} linear "
         "experts or heads): universal BT (one linear head); random heads + adaptation (the "
         f"universal head and {args.random_heads - 1} random perturbations of it of the same "
         "norm, nothing trained, the control of the issue); shared-base ensemble (10 heads "
         "trained on their own BT losses, each anchored to its random start); sparse MoE "
         "(top-2 router on the prompt plus a learned routing bias per training user, Bradley-"
         "Terry on the mixed reward, sparsity 0.05, balance 0.1, diversity 0.05, straight-"
         "through router gradient; chosen on validation seed 100); its mixture-of-BT "
         "(MiCRo-style) variant; the dense softmax MoE (all 10 experts, per-user routing, "
         "no regulariser: LoRe-like); and the sparse MoE with prompt routing only (the paper's "
         "set-up, no user ids). Global accuracy: no user information (a model with per-user "
         "routing averages the gates over its training users). Adaptation: Hedge (eta 0.1), "
         "HyRe (beta 1), gradient on routing logits (100 Adam steps, lr 0.1), uniform prior.",
         "", "Values: mean over seeds ± std over the 20 resampled adaptation sets (mean of "
         "the per-seed stds); the JSON has the std over seeds too.", "",
         "## Accuracy at n = 10 adaptation pairs", "",
         "| model, adaptation | " + " | ".join(CELL_NAMES) + " | global (unseen prompts) |",
         "|---|" + "---|" * (len(CELLS) + 1)]
    for name in names:
        for method in methods_of(runs, name):
            L.append(f"| {label(name, method)} | "
                     + " | ".join(fmt(cell(runs, name, method, c, 10)) for c in CELLS)
                     + f" | {global_acc(runs, name):.3f} |")
    L += ["", "## Few-shot curves: unseen users, unseen prompts", "",
          "| model, adaptation | " + " | ".join(f"n={n}" for n in args.shots) + " |",
          "|---|" + "---|" * len(args.shots)]
    for name in names:
        for method in methods_of(runs, name):
            L.append(f"| {label(name, method)} | "
                     + " | ".join(fmt(cell(runs, name, method, TARGET, n)) for n in args.shots) + " |")
    L += targets(runs)
    L += ["", "## Ablations of the sparse MoE (n = 10, unseen users, unseen prompts)", "",
          "| variant | Hedge | HyRe | gradient | global | expert / base-reward match |",
          "|---|---|---|---|---|---|"]
    for name in ["sparse MoE"] + ablations:
        L.append(f"| {name} | " + " | ".join(fmt(cell(runs, name, m, TARGET, 10)) for m in METHODS)
                 + f" | {global_acc(runs, name):.3f} | {match(runs, name):.3f} |")
    L += ["", "## Experts", "",
          "Routing as trained (each pair with its labeller's bias where the model has them), "
          "on 5000 training pairs; match: mean over the 10 base rewards of the best "
          "correlation of an expert's margins with the base reward's (1.0: each base reward "
          "has an expert that ranks pairs exactly like it).", "",
          "| model | routing entropy (max ln E) | dead experts | load min / max | match |",
          "|---|---|---|---|---|"]
    for name in names + ablations:
        r = [run["models"][name] for run in runs]
        if "routing" not in r[0]:
            L.append(f"| {name} | - | - | - | {match(runs, name):.3f} |")
            continue
        stats = [x.get("routing_per_user", x["routing"]) for x in r]
        L.append(f"| {name} | {mean(s['routing_entropy'] for s in stats):.2f} "
                 f"({np.log(len(stats[0]['load'])):.2f}) | "
                 f"{mean(len(s['dead_experts']) for s in stats):.1f} | "
                 f"{mean(min(s['load']) for s in stats):.3f} / {mean(max(s['load']) for s in stats):.3f}"
                 f" | {match(runs, name):.3f} |")
    L += ["", "## Sensitivity: users that agree more (seed "
          f"{args.seeds[0]}, n = 10, unseen users, unseen prompts)", "",
          "Shared-quality cosine c: each base reward is unit(c q + sqrt(1 - c^2) u_k) for a "
          "shared direction q, so base rewards correlate c^2.", "",
          "| shared quality | universal BT | random heads + HyRe | sparse MoE, best adaptation |",
          "|---|---|---|---|"]
    for sq, rows in sens.items():
        one = lambda name, m: at(rows[name]["adapted"][m][TARGET], 10)["mean"]  # noqa: E731
        L.append(f"| {sq} | {one('universal BT', 'hyre'):.3f} | "
                 f"{one('random heads + adaptation', 'hyre'):.3f} | "
                 f"{max(one('sparse MoE', m) for m in METHODS):.3f} |")
    L += ["", "Plots: `reward_population_fewshot.png` (few-shot curves, shaded: std over "
          "resamples), `reward_population_experts.png` (expert load as trained, seed "
          f"{args.seeds[0]}), `reward_population_match.png` (expert / base-reward correlations), "
          "`reward_population_shifts.png` (unseen users' true weights beside their adapted "
          "weight shifts, 10 pairs).", ""]
    return "\n".join(L)


def match(runs, name):
    return mean(r["models"][name]["match"]["mean_best_correlation"] for r in runs)


def targets(runs):
    method, (moe, _, _) = best(runs, "sparse MoE")
    uni = cell(runs, "universal BT", "hyre", TARGET, 10)[0]
    heads = cell(runs, "random heads + adaptation", "hyre", TARGET, 10)[0]
    g_moe, g_uni = global_acc(runs, "sparse MoE"), global_acc(runs, "universal BT")

    def verdict(ok):
        return "**hit**" if ok else "**miss**"

    return ["", "## Targets (unseen users, unseen prompts, n = 10)", "",
            "| target | measured | |", "|---|---|---|",
            f"| sparse MoE + best adaptation ({method}) >= universal BT + 15 points | "
            f"{moe:.3f} vs {uni:.3f}: {100 * (moe - uni):+.1f} points | {verdict(moe - uni >= 0.15)} |",
            f"| >= random heads + HyRe + 5 points | {moe:.3f} vs {heads:.3f}: "
            f"{100 * (moe - heads):+.1f} points | {verdict(moe - heads >= 0.05)} |",
            f"| global accuracy within 2 points of universal BT | {g_moe:.3f} vs {g_uni:.3f}: "
            f"{100 * (g_moe - g_uni):+.1f} points | {verdict(abs(g_moe - g_uni) <= 0.02)} |"]


def plots(runs, out):
    shots = sorted(int(n) for n in runs[0]["models"]["sparse MoE"]["adapted"]["hyre"][TARGET])
    series, errors = {}, {}
    for name, method in [("sparse MoE", "gradient"), ("sparse MoE", "hyre"), ("sparse MoE", "hedge"),
                         ("dense softmax MoE", "gradient"),
                         ("sparse MoE, prompt routing only", "gradient"),
                         ("random heads + adaptation", "hyre"), ("shared-base ensemble", "hyre"),
                         ("universal BT", "hyre")]:
        values = [cell(runs, name, method, TARGET, n) for n in shots]
        series[label(name, method)] = (shots, [v[0] for v in values])
        errors[label(name, method)] = [v[1] for v in values]
    P.curves(series, os.path.join(out, "reward_population_fewshot.png"),
             "adaptation pairs n", "accuracy, unseen users x unseen prompts", logx=True,
             title="Few-shot personalisation (mean over seeds)", errors=errors)
    main = runs[0]["models"]["sparse MoE"]
    stats = main.get("routing_per_user", main["routing"])
    P.bars(stats["load"], os.path.join(out, "reward_population_experts.png"), "expert",
           "share of the gate mass", f"Sparse MoE expert load (seed {runs[0]['seed']}): routing "
           f"entropy {stats['routing_entropy']:.2f} nats, {len(stats['dead_experts'])} dead experts")
    P.routing_heatmap(main["match"]["correlation"], os.path.join(out, "reward_population_match.png"),
                      "Expert vs base-reward margin correlation", ylabel="expert",
                      xlabel="base reward", vmin=-1.0, cmap="RdBu_r")
    shifts = runs[0].get("shifts")
    if shifts:
        true = np.asarray(shifts["true"])
        to_expert = main["match"]["base_to_expert"]
        by_expert = np.zeros((true.shape[0], len(shifts["prior"])))
        for k, e in enumerate(to_expert):
            by_expert[:, e] += true[:, k]
        P.user_shift_heatmap(by_expert, np.asarray(shifts["weights"]) - np.asarray(shifts["prior"]),
                             os.path.join(out, "reward_population_shifts.png"), 10,
                             true_title="true weights over base rewards\n(each on its best-matching expert)",
                             method="sparse MoE, gradient")
