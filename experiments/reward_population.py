"""The sparse MoE reward model under the field's evaluation protocol, on an offline
PersonalLLM-style population (moe_ext.reward.population): seen and unseen users crossed
with seen and unseen prompts (macro-averaged per user), few-shot curves at n = 1, 2, 5, 10,
20, 50 adaptation pairs over 20 resampled adaptation sets, global accuracy, and the
controls and baselines (universal BT, random heads + HyRe, shared-base ensemble, dense
softmax MoE, mixture-of-BT objective, MoE without regularisers, prompt-only routing).

Run: .venv/bin/python experiments/reward_population.py            (about 1 hour, 2 cores)
     .venv/bin/python experiments/reward_population.py --quick    (a smoke run, minutes)
Writes experiments/results/reward_population.{md,json} and four PNG plots.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from moe_ext import reward  # noqa: E402
from moe_ext.reward.baselines import HeadEnsemble, random_heads  # noqa: E402
from moe_ext.reward.evaluate import ProtocolConfig, evaluate_population, unseen_user_weights  # noqa: E402
from moe_ext.reward.interpret import base_reward_match, routing_stats  # noqa: E402
from moe_ext.reward.population import Pairs, PopulationConfig, make_population  # noqa: E402
from moe_ext.utils.facts import run_facts  # noqa: E402
from moe_ext.utils.io import read_json, write_json, write_text  # noqa: E402
from reward_population_report import markdown, plots  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")
NO_REG = dict(sparsity_coef=0.0, balance_coef=0.0, diversity_coef=0.0)
# The main sparse MoE, chosen on validation seed 100 (never on the reported seeds): top-2 of
# E = 10 linear experts, per-user routing biases for the training users, straight-through
# router gradient, Bradley-Terry on the mixed reward, default regularisers.
MAIN = dict(top_k=2, users=True, fit=dict(objective="mixed_reward", dense_router_grad=True))
# name -> (kind, options); "full": the whole protocol, else n = 10 only
MODELS = {
    "universal BT": ("universal", {}),
    "random heads + adaptation": ("random_heads", {}),
    "shared-base ensemble": ("ensemble", {}),
    "sparse MoE": ("moe", MAIN),
    "sparse MoE, mixture-of-BT objective": ("moe", {**MAIN, "fit": dict(objective="mixture", dense_router_grad=True)}),
    "dense softmax MoE": ("moe", {**MAIN, "top_k": None, "fit": dict(objective="mixed_reward", **NO_REG)}),
    "sparse MoE, prompt routing only": ("moe", {**MAIN, "users": False}),
}
ABLATIONS = {
    "ablation: no regulariser": ("moe", {**MAIN, "fit": {**MAIN["fit"], **NO_REG}}),
    "ablation: no sparsity": ("moe", {**MAIN, "fit": {**MAIN["fit"], "sparsity_coef": 0.0}}),
    "ablation: no balance": ("moe", {**MAIN, "fit": {**MAIN["fit"], "balance_coef": 0.0}}),
    "ablation: no diversity": ("moe", {**MAIN, "fit": {**MAIN["fit"], "diversity_coef": 0.0}}),
    "ablation: no straight-through": ("moe", {**MAIN, "fit": dict(objective="mixed_reward")}),
}
SENSITIVITY = ["universal BT", "random heads + adaptation", "sparse MoE"]


def build_and_fit(kind, options, pop, args, cache):
    """A trained model of `kind` on the population's training pairs."""
    p, c, r = pop.embeddings(pop.train)
    P, Dr, E = p.shape[1], c.shape[1], args.experts
    common = dict(epochs=args.epochs, batch_size=256, progress=False, seed=pop.config.seed)
    torch.manual_seed(pop.config.seed)
    if kind in ("universal", "random_heads"):
        if "universal" not in cache:
            cache["universal"] = reward.UniversalRewardModel(Dr)
            reward.fit(cache["universal"], p, c, r, **common)
        return cache["universal"] if kind == "universal" else random_heads(
            cache["universal"], args.random_heads, scale=1.0, seed=pop.config.seed)
    if kind == "ensemble":
        model = HeadEnsemble(Dr, E, anchor_coef=0.1, init_scale=3.0, seed=pop.config.seed)
        reward.fit(model, p, c, r, **common)
        return model
    users = pop.seen_weights.shape[0] if options["users"] else 0
    model = reward.SparseMoERewardModel(P, Dr, E, options["top_k"] or E, num_users=users)
    reward.fit(model, p, c, r, user_ids=pop.train.user if users else None,
               **common, **options["fit"])
    return model


def describe(model, pop):
    """Routing statistics (MoE) and the expert / base-reward match on 5000 training pairs."""
    head = Pairs(*(t[:5000] for t in (pop.train.prompt, pop.train.chosen, pop.train.rejected,
                                      pop.train.user)))
    p, c, r = pop.embeddings(head)
    out = {"match": base_reward_match(reward.expert_margins(model, c, r), pop.base_margins(head))}
    if isinstance(model, reward.SparseMoERewardModel):
        out["routing"] = routing_stats(model, p)
        if model.num_users:  # as trained: each pair routed with its labeller's bias
            out["routing_per_user"] = routing_stats(model, p, head.user)
    return out


def run_seed(seed, args, log):
    pop = make_population(PopulationConfig(seed=seed, alpha=args.alpha,
                                           shared_quality=args.shared_quality, **args.sizes))
    full = ProtocolConfig(shots=args.shots, resamples=args.resamples, seen_users=args.seen_users,
                          seed=seed)
    short = ProtocolConfig(**{**full.to_dict(), "shots": [10]})
    out, cache = {"seed": seed, "models": {}}, {}
    for name, (kind, options) in {**MODELS, **ABLATIONS}.items():
        t0 = time.time()
        model = build_and_fit(kind, options, pop, args, cache)
        t1 = time.time()
        protocol = short if name.startswith("ablation") else full
        out["models"][name] = {**evaluate_population(model, pop, protocol), **describe(model, pop),
                               "fit_seconds": round(t1 - t0, 1),
                               "eval_seconds": round(time.time() - t1, 1)}
        log(f"seed {seed}: {name} (fit {t1 - t0:.0f} s, eval {time.time() - t1:.0f} s)")
        if name == "sparse MoE" and seed == args.seeds[0]:
            w = unseen_user_weights(model, pop, 10, "gradient", full, users=30)
            prior = reward.average_routing(model, pop.embeddings(pop.unseen_eval["unseen_prompts"])[0])
            out["shifts"] = {"weights": w.tolist(), "prior": prior.tolist(),
                             "true": pop.unseen_weights[:30].tolist()}
    return out


def sensitivity(args, log):
    """Universal BT, random heads and the sparse MoE at n = 10 as users agree more."""
    rows = {}
    for sq in args.sensitivity:
        pop = make_population(PopulationConfig(seed=args.seeds[0], alpha=args.alpha,
                                               shared_quality=sq, **args.sizes))
        protocol = ProtocolConfig(shots=[10], resamples=args.resamples, seen_users=args.seen_users,
                                  seed=args.seeds[0])
        cache = {}
        for name in SENSITIVITY:
            kind, options = MODELS[name]
            model = build_and_fit(kind, options, pop, args, cache)
            rows.setdefault(str(sq), {})[name] = evaluate_population(model, pop, protocol)
        log(f"sensitivity: shared_quality {sq} done")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--experts", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--shared-quality", type=float, default=0.0)
    parser.add_argument("--sensitivity", type=float, nargs="*", default=[0.3, 0.5])
    parser.add_argument("--random-heads", type=int, default=64)
    parser.add_argument("--resamples", type=int, default=20)
    parser.add_argument("--seen-users", type=int, default=200, help="seen users evaluated")
    parser.add_argument("--quick", action="store_true", help="small population, a smoke run")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--replot", action="store_true",
                        help="redo the markdown and plots from the saved JSON, run nothing")
    args = parser.parse_args(argv)
    if args.replot:
        saved = read_json(os.path.join(args.out, "reward_population.json"))
        old = argparse.Namespace(**saved["facts"]["args"])
        write_text(os.path.join(args.out, "reward_population.md"),
                   markdown(saved["runs"], saved["sensitivity"], saved["facts"], old))
        plots(saved["runs"], args.out)
        return
    args.shots = [1, 2, 5, 10, 20, 50]
    args.sizes = {}
    if args.quick:
        args.sizes = dict(prompts=3000, seen_users=200, unseen_users=60, seen_user_share=0.02)
        args.resamples, args.seen_users, args.epochs, args.seeds = 4, 40, 4, args.seeds[:1]
    torch.set_num_threads(1)  # these tiny models run faster on one thread of a shared machine
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:6.0f} s] {msg}", flush=True)

    runs = [run_seed(seed, args, log) for seed in args.seeds]
    sens = sensitivity(args, log)
    facts = {**run_facts(), "seconds": round(time.time() - t0, 1),
             "args": {k: v for k, v in vars(args).items()}}
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "reward_population.json"),
               {"facts": facts, "runs": runs, "sensitivity": sens}, indent=None)
    write_text(os.path.join(args.out, "reward_population.md"), markdown(runs, sens, facts, args))
    plots(runs, args.out)
    log("done")


if __name__ == "__main__":
    main()
