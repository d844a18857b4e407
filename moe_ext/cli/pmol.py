"""`moe-ext train-pmol`: a thin shell over moe_ext.pmol.run_pmol_job."""
from __future__ import annotations

import os

from ..pmol import PMoLJob, prepare_data, run_pmol_job
from ..training import init_distributed
from .common import add_json, add_progress, add_source, fail, job_from_args, print_json


def cmd_train_pmol(args) -> int:
    """DPO + expert-group + balance losses on a tiny Llama-style LM built from a config."""
    try:
        job = job_from_args(PMoLJob, args, resume=not args.no_resume,
                            progress=not args.no_progress and not args.json)
        prepared = prepare_data(job)
        job.validate(prepared.groups)
    except (OSError, ValueError) as err:
        return fail(str(err))
    run = run_pmol_job(job, args.output, prepared)
    if init_distributed()[0] != 0:
        return 0
    if args.json:
        print_json(run.metrics)
        return 0
    print(f"saved adapter to {os.path.join(args.output, 'adapter')}")
    for name, row in run.metrics["eval"].items():
        extra = (f"  routing accuracy {row['routing_accuracy']:.3f}"
                 if "routing_accuracy" in row else "")
        print(f"{name:>10}: DPO accuracy {row['dpo_accuracy']:.3f}{extra}  (n={row['n']})")
    return 0


def register(sub) -> None:
    d = PMoLJob
    p = sub.add_parser(
        "train-pmol", help="train a PMoL adapter (DPO + expert groups) on preference data",
        description="Train a PMoL preference-mixing adapter: LoRA experts grouped per "
                    "preference, null experts, expert-group soft loss, load balance and DPO "
                    "against the same model with adapters off. Runs under torchrun (DDP).")
    add_source(p, "JSONL with prompt, chosen, rejected, preference per line",
               "the built-in synthetic data (concise / verbose / safe)")
    p.add_argument("--synthetic-size", type=int, default=d.synthetic_size,
                   help="examples per preference")
    p.add_argument("--output", default="out/pmol", help="folder for adapter, metrics, checkpoint")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="examples per micro-step and rank")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--beta", type=float, default=d.beta, help="DPO beta")
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--experts-per-group", type=int, default=d.experts_per_group)
    p.add_argument("--null-experts", type=int, default=d.null_experts)
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--rank", type=int, default=d.rank, help="LoRA rank r of each expert")
    p.add_argument("--alpha", type=float, default=d.alpha, help="lora_alpha")
    p.add_argument("--target-modules", default=d.target_modules)
    p.add_argument("--group-loss-coef", type=float, default=d.group_loss_coef)
    p.add_argument("--aux-loss-coef", type=float, default=d.aux_loss_coef)
    p.add_argument("--hidden", type=int, default=d.hidden, help="base model width")
    p.add_argument("--layers", type=int, default=d.layers, help="base model depth")
    p.add_argument("--eval-fraction", type=float, default=d.eval_fraction)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    add_progress(p)
    p.add_argument("--seed", type=int, default=d.seed)
    add_json(p)
    p.set_defaults(func=cmd_train_pmol)
