"""PMoL evaluated as preference-mixing work evaluates it: generations, Pareto fronts,
baselines. On the four-preference mixing world (moe_ext.pmol.mixing_world: concise vs
verbose, safe vs helpful; a quarter of the training prompts without their preference's
marker, --unmarked), a base model is first fine-tuned on the data's responses (SFT, 1000
steps: the built-in model learns to answer, i.e. copy the asked-for word, only after about
1000; skipped with --sft-steps 0), then each method trains its adapter with DPO + RPO through the
PMoL job API (moe_ext.pmol.run_pmol_job) under the same step budget:

  PMoL                     4 groups x 2 experts + 1 null expert, group soft loss
  PMoL, steerable          the same, but its routers take the preference mix lambda as an
    (λ-trained)            input (under a mix the mix alone decides between the groups) and
                           it trains over lambda ~ Dirichlet(--mix-alpha), one per pair, on
                           the lambda-weighted DPO + RPO (each pair weighted by its own
                           preference's lambda); a share of pairs without a mix, whose loss
                           counts as much as the mixed pairs'; group loss 2.0 on the prompt's
                           own routing of every pair
  PMoL, steerable,         the same on data relabelled with a label per preference by the
    relabelled             world's scorers (moe_ext.pmol.relabel): every pair teaches every
                           preference it separates
  PMoL, no null expert     the same without the null expert
  MixLoRA-style mixture    the same experts and routers, no group loss
  single LoRA              one LoRA with the experts' total rank, on the mixed data
  Rewarded Soups           one LoRA per preference (its group's rank) on that preference's
                           data, steps / 4 each; mixed by weight interpolation

Each model then samples replies, scored by moe_ext.pmol.scorers: (1) to held-out prompts
that carry a preference's marker (conditioned), (2) to neutral prompts while the mix of a
conflicting pair is swept (group biases for the mixtures, interpolation weights for the
soups, the mix as the routers' input for the steerable PMoL), giving each method's Pareto
front, hypervolume, steering ranges and per-seed monotonicity per pair. Means over seeds.

Run: .venv/bin/python experiments/pmol_mixing.py        (about 6 min on 2 shared cores, longer under load)
     .venv/bin/python experiments/pmol_mixing.py --model FOLDER   (a local HF causal LM)
     .venv/bin/python experiments/pmol_mixing.py --replot         (md + plots from the json)
     .venv/bin/python experiments/pmol_mixing.py --seeds 3 4 5 --out DIR   (more seeds)
Writes experiments/results/pmol_mixing.{md,json}, pmol_mixing_fronts.png (neutral prompts)
and pmol_mixing_fronts_marked.png (the pair's own prompts).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from moe_ext import MoLoRAConfig, get_molora_model, pmol  # noqa: E402
from moe_ext.hf.models import load_pretrained, load_tokenizer  # noqa: E402
from moe_ext.training import TrainConfig  # noqa: E402
from moe_ext.utils.facts import run_facts  # noqa: E402
from moe_ext.utils.io import read_json, write_json, write_text  # noqa: E402
from pmol_mixing_report import markdown, plot_fronts  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")
GROUPS = list(pmol.MIXING_PREFERENCES)
PAIRS = [("concise", "verbose"), ("safe", "helpful")]
EXPERTS_PER_GROUP = 2
# name -> PMoLJob overrides of the mixtures (all steered by group biases)
MIXTURES = {
    "PMoL": {},
    "PMoL, no null expert": {"null_experts": 0},
    "MixLoRA-style, no group loss": {"group_loss_coef": 0.0},
}
# name -> (PMoLJob overrides beyond mix_alpha, relabel the data with the scorers); steered by
# the mix as the routers' input (pmol.mix_sweep)
# group loss 2.0 (PMoL's 0.5): with no mix the prompt alone must route these models, while
# their experts learn to follow the mix (relabelled: whatever the prompt asks); a sharper
# prompt router keeps the conditioned scores (measured in experiments/results/pmol_mixing.md)
STEERABLE_OVERRIDES = {"group_loss_coef": 2.0}
STEERABLE = {
    "PMoL, steerable (λ-trained)": (STEERABLE_OVERRIDES, False),
    "PMoL, steerable (λ-trained), relabelled": (STEERABLE_OVERRIDES, True),
}


def job_for(args, seed: int, **overrides) -> pmol.PMoLJob:
    values = dict(experts_per_group=EXPERTS_PER_GROUP, null_experts=1, rank=args.rank,
                  alpha=2.0 * args.rank, steps=args.steps, lr=args.lr, beta=args.beta,
                  rpo_alpha=args.rpo_alpha, batch_size=args.batch_size, seed=seed, progress=False)
    return pmol.PMoLJob(**{**values, **overrides})


def base_model(args, tok, train, seed: int):
    """The SFT'd base: the built-in tiny Llama (or --model), full fine-tuning on both responses."""
    if args.model:
        base = load_pretrained(args.model)
    else:
        base = pmol.build_tiny_causal_lm(len(tok), hidden=args.hidden, layers=args.layers, seed=seed)
    if args.sft_steps:
        pmol.train_sft(base, train, tok, TrainConfig(steps=args.sft_steps, lr=args.sft_lr, seed=seed,
                                                     progress=False), batch_size=args.batch_size)
    for p in base.parameters():
        p.requires_grad_(False)
    return base


def adapted(base, config, seed: int):
    """A copy of the base with a fresh adapter, its init seeded here: the global RNG is left
    wherever the previous method's sampling put it."""
    torch.manual_seed(seed)
    return get_molora_model(copy.deepcopy(base), config)


def single_lora(base, rank: int, seed: int):
    return adapted(base, MoLoRAConfig(
        r=rank, lora_alpha=2.0 * rank, num_experts=1, top_k=1, target_modules="all-linear"), seed)


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def unsteered(model, tok, options):
    """The 'sweep' of a model without steering: one point, its replies to the prompts."""
    return lambda pair, prompts: [{"weights": {}, "scores": pmol.score_replies(
        prompts, pmol.generate_batch(model, tok, prompts, options), pair)}]


def evaluate(model, tok, held, prompts, options, pair_sweep) -> dict:
    """Conditioned and neutral-prompt scores, and per pair its sweep with its summary on the
    neutral prompts ("sweeps") and on the held-out prompts of the pair's two preferences,
    which carry their markers ("marked_sweeps": can steering override the prompt?)."""
    row = {"conditioned": pmol.conditioned_scores(model, tok, held, options),
           "neutral": pmol.score_replies(prompts, pmol.generate_batch(model, tok, prompts, options), GROUPS),
           "sweeps": {}, "marked_sweeps": {}}
    for pair in PAIRS:
        marked = [e.prompt for e in held if e.preference in pair]
        for key, qs in (("sweeps", prompts), ("marked_sweeps", marked)):
            sweep = pair_sweep(pair, qs)
            row[key]["/".join(pair)] = {"points": sweep, **pmol.summarize_sweep(sweep, pair)}
    return row


def run_seed(args, seed: int, log) -> list[dict]:
    tok = load_tokenizer(args.model) if args.model else pmol.mixing_tokenizer()
    train = pmol.mixing_preference_data(args.train_size, seed=100 + seed, unmarked=args.unmarked)
    held = pmol.mixing_preference_data(args.eval_size, seed=200 + seed)
    prompts = pmol.neutral_prompts(args.prompts, seed=300 + seed)
    options = pmol.GenerationOptions(max_new_tokens=args.max_new_tokens, do_sample=True,
                                     temperature=args.temperature, seed=seed)
    prepared = pmol.PMoLData(train, held, tok, GROUPS)
    t0 = time.time()
    base = base_model(args, tok, train, seed)
    rows = [{"method": "SFT base (no adapter)", "seed": seed, "params": 0,
             "seconds": round(time.time() - t0, 1),
             **evaluate(base, tok, held, prompts, options, unsteered(base, tok, options))}]

    def finish(name, model, seconds, metrics, pair_sweep, params=None):
        rows.append({"method": name, "seed": seed, "params": params or trainable(model),
                     "seconds": round(seconds, 1), "eval": metrics,
                     **evaluate(model, tok, held, prompts, options, pair_sweep)})
        log(f"seed {seed} {name}: {rows[-1]['seconds']} s, conditioned "
            + " ".join(f"{g} {v:.2f}" for g, v in rows[-1]["conditioned"].items()))

    def wanted(name):
        return not args.methods or any(name.startswith(m) for m in args.methods)

    for name, overrides in MIXTURES.items():
        if not wanted(name):
            continue
        job = job_for(args, seed, **overrides)
        t = time.time()
        run = pmol.run_pmol_job(job, prepared=prepared,
                                model=adapted(base, job.molora_config(GROUPS), seed))
        seconds = time.time() - t
        for i, strength in enumerate(args.strengths):  # the same model, steered harder
            finish(name if i == 0 else f"{name}, bias x{strength:g}", run.model, seconds,
                   run.metrics["eval"],
                   lambda pair, qs: pmol.steering_sweep(run.model, tok, qs, pair, args.points,
                                                        options, strength))
    relabelled = pmol.PMoLData(pmol.relabel(train, {g: pmol.SCORERS[g] for g in GROUPS}),
                               held, tok, GROUPS)
    for name, (overrides, relabel) in STEERABLE.items():
        if not wanted(name):
            continue
        job = job_for(args, seed, mix_alpha=args.mix_alpha, mix_none_prob=args.mix_none_prob,
                      **overrides)
        t = time.time()
        run = pmol.run_pmol_job(job, prepared=relabelled if relabel else prepared,
                                model=adapted(base, job.molora_config(GROUPS), seed))
        finish(name, run.model, time.time() - t, run.metrics["eval"],
               lambda pair, qs: pmol.mix_sweep(run.model, tok, qs, pair, args.points, options))
    if wanted("single LoRA"):
        t = time.time()
        run = pmol.run_pmol_job(job_for(args, seed), prepared=prepared,
                                model=single_lora(base, args.rank * EXPERTS_PER_GROUP * len(GROUPS), seed))
        finish("single LoRA", run.model, time.time() - t, run.metrics["eval"],
               unsteered(run.model, tok, options))
    if not wanted("Rewarded Soups"):
        return rows
    t, states = time.time(), {}
    soup = single_lora(base, args.rank * EXPERTS_PER_GROUP, seed)
    for g in GROUPS:  # Rewarded Soups: one LoRA per preference from one shared init, same total steps
        own = pmol.PMoLData([e for e in train if e.preference == g],
                            [e for e in held if e.preference == g], tok, [g])
        states[g] = pmol.adapter_state(pmol.run_pmol_job(
            job_for(args, seed, steps=max(1, args.steps // len(GROUPS))), prepared=own,
            model=single_lora(base, args.rank * EXPERTS_PER_GROUP, seed)).model)
    seconds = time.time() - t
    pmol.load_interpolated(soup, list(states.values()), [1 / len(GROUPS)] * len(GROUPS))
    finish("Rewarded Soups", soup, seconds, pmol.evaluate_pmol(soup, held, tok, args.beta),
           lambda pair, qs: pmol.soup_sweep(soup, states, tok, qs, pair, args.points, options),
           params=trainable(soup) * len(GROUPS))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds (the committed results: 0 1 2; e.g. --seeds 3 4 5 --out DIR for more)")
    parser.add_argument("--methods", nargs="+", help="only the methods whose names start with these "
                        "(development runs; the SFT base always runs)")
    parser.add_argument("--model", help="a local Hugging Face causal LM folder (default: the built-in tiny Llama)")
    parser.add_argument("--hidden", type=int, default=64, help="built-in base width")
    parser.add_argument("--layers", type=int, default=2, help="built-in base depth")
    parser.add_argument("--sft-steps", type=int, default=1000, help="full fine-tuning steps of the base; 0 skips")
    parser.add_argument("--sft-lr", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, default=200, help="DPO steps of each method")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank of each expert")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--rpo-alpha", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-size", type=int, default=300, help="training pairs per preference")
    parser.add_argument("--unmarked", type=float, default=0.25,
                        help="share of the training prompts without their preference's marker")
    parser.add_argument("--eval-size", type=int, default=60, help="held-out pairs per preference")
    parser.add_argument("--prompts", type=int, default=48, help="neutral prompts per sweep point")
    parser.add_argument("--points", type=int, default=5, help="mixes per sweep")
    parser.add_argument("--strengths", type=float, nargs="+", default=[1.0, 3.0],
                        help="steering strengths of the mixtures: group bias = strength * log(weight)")
    parser.add_argument("--mix-alpha", type=float, default=0.25,
                        help="Dirichlet concentration of the steerable PMoL's training mixes")
    parser.add_argument("--mix-none-prob", type=float, default=0.25,
                        help="share of the steerable PMoL's steps without a mix")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--replot", action="store_true", help="rewrite md and plots from the json")
    args = parser.parse_args(argv)
    path = os.path.join(args.out, "pmol_mixing.json")
    if args.replot:
        saved = read_json(path)
        rows, facts = saved["rows"], saved["facts"]
    else:
        torch.set_num_threads(args.threads)
        t0, rows = time.time(), []
        for seed in args.seeds:
            rows += run_seed(args, seed, lambda msg: print(msg, flush=True))
        import transformers
        facts = {**run_facts(), "transformers": transformers.__version__,
                 "seconds": round(time.time() - t0, 1), "args": vars(args),
                 "steerable_overrides": STEERABLE_OVERRIDES, "argv": list(argv or sys.argv[1:])}
        write_json(path, {"facts": facts, "rows": rows}, indent=1)
    write_text(os.path.join(args.out, "pmol_mixing.md"), markdown(rows, facts, GROUPS, PAIRS))
    plot_fronts(rows, PAIRS, os.path.join(args.out, "pmol_mixing_fronts.png"))
    plot_fronts(rows, PAIRS, os.path.join(args.out, "pmol_mixing_fronts_marked.png"), "marked_sweeps",
                "prompts with their markers")


if __name__ == "__main__":
    main()
