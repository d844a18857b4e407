"""`moe-ext train-pmol`: a thin shell over moe_ext.pmol (prepare_data, prepare_model,
run_pmol_job)."""
from __future__ import annotations

import os

from ..hf.models import DTYPES
from ..pmol import PMoLJob, prepare_data, prepare_model, run_pmol_job
from ..molora.model import TargetModulesError
from ..pmol.job import check_resume
from ..pmol.synthetic import HEADS
from ..training import init_distributed
from .common import (add_json, add_progress, add_source, batch_int, check_exists, check_writable,
                     count_int, data_extras, experts_int, fail, job_from_args, layers_int,
                     nonnegative_float, number_type, open_fraction, parse_target_modules,
                     positive_float, print_json, quiet_transformers, seed_int, some_experts_int,
                     tokens_int, width_int)

label_smoothing = number_type(float, "a number in [0, 0.5)", lambda v: 0 <= v < 0.5)
mix_none_prob = number_type(float, "a number in [0, 1)", lambda v: 0 <= v < 1)


def cmd_train_pmol(args) -> int:
    """DPO + expert-group + balance losses on a causal LM with a PMoL adapter."""
    quiet_transformers()
    try:
        check_writable(args.output, "--output")
        if args.init_adapter:
            check_exists(args.init_adapter, "--init-adapter")
        if args.split is not None and (args.data is None or os.path.isfile(args.data) or
                                       args.data.lower().endswith((".jsonl", ".json", ".parquet"))):
            raise ValueError(f"--split {args.split}: only for a datasets folder or dataset name, "
                             f"not for {'--synthetic data' if args.data is None else 'the file ' + args.data}")
        args.split = args.split or PMoLJob.split
        if args.model is None and args.hidden % HEADS:
            raise ValueError(f"--hidden {args.hidden}: the built-in model needs a multiple of "
                             f"{HEADS} (its attention heads)")
        job = job_from_args(PMoLJob, args, chat_template=not args.no_chat_template,
                            target_modules=parse_target_modules(args.target_modules),
                            progress=not args.no_progress and not args.json)
        prepared = prepare_data(job)
        total = job.experts_per_group * len(prepared.groups) + job.null_experts
        if job.top_k > total:
            raise ValueError(f"--top-k {job.top_k}: at most --experts-per-group x groups + "
                             f"--null-experts = {total} experts to choose from")
        job.validate(prepared.groups)
        check_resume(job, args.output)
        model = prepare_model(job, prepared)
        run = run_pmol_job(job, args.output, prepared, model)
    except TargetModulesError as err:
        return fail(f"--target-modules: {err}")
    except (OSError, ValueError) as err:
        return fail(str(err))
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
    add_source(p, "preference data in TRL's formats (standard or conversational, explicit or "
                  "implicit prompt): a .jsonl, .json or .parquet file, a datasets folder or a "
                  "dataset name; the --preference-column names each row's group",
               "the built-in synthetic data (concise / verbose / safe)")
    p.add_argument("--split", default=None,
                   help=f"split of a datasets folder or name (default {d.split}; not for files)")
    p.add_argument("--preference-column", default=d.preference_column,
                   help="the column naming each row's preference; rows without one skip the "
                        "group loss")
    p.add_argument("--synthetic-size", type=count_int, default=d.synthetic_size,
                   help="examples per preference")
    p.add_argument("--model", help="causal LM to adapt: hub id or local folder (default: a "
                                   "built-in tiny Llama, see --hidden and --layers)")
    p.add_argument("--tokenizer", help="tokenizer hub id or folder (default: the model's; "
                                       "without --model, a word tokenizer over the data)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=d.dtype, help="dtype of --model")
    p.add_argument("--max-length", type=tokens_int, help="truncate prompt + response to this many tokens")
    p.add_argument("--max-prompt-length", type=tokens_int, help="keep the last tokens of long prompts")
    p.add_argument("--no-chat-template", action="store_true",
                   help="tokenise standard-format rows as plain text even when the tokenizer "
                        "has a chat template")
    p.add_argument("--init-adapter", help="start from this MoLoRA adapter folder (e.g. from "
                                          "`moe-ext convert --from-peft-groups`)")
    p.add_argument("--output", default="out/pmol", help="folder for adapter, metrics, checkpoint")
    p.add_argument("--resume", action="store_true",
                   help="continue the checkpoint in --output (refused if it was trained on "
                        "another model, adapter or data)")
    p.add_argument("--steps", type=count_int, default=d.steps)
    p.add_argument("--batch-size", type=batch_int, default=d.batch_size,
                   help="examples per micro-step and rank")
    p.add_argument("--grad-accum", type=batch_int, default=d.grad_accum)
    p.add_argument("--lr", type=positive_float, default=d.lr)
    p.add_argument("--beta", type=positive_float, default=d.beta, help="DPO beta")
    p.add_argument("--label-smoothing", type=label_smoothing, default=d.label_smoothing)
    p.add_argument("--rpo-alpha", type=nonnegative_float, default=d.rpo_alpha,
                   help="weight of the chosen responses' negative log-likelihood added to DPO "
                        "(RPO, as TRL's rpo_alpha); keeps small models' generations fluent")
    p.add_argument("--mix-alpha", type=positive_float, default=d.mix_alpha,
                   help="a steerable adapter: routers that take the preference mix (moe-ext "
                        "generate --mix), trained over mixes ~ Dirichlet(MIX_ALPHA), one per pair "
                        "(below 1: mostly near one or two groups); rows weighted by their own "
                        "preference's weight, or by a label per preference (preference_labels, "
                        "which steered better in experiments/pmol_mixing.py, with "
                        "--group-loss-coef 2)")
    p.add_argument("--mix-none-prob", type=mix_none_prob, default=d.mix_none_prob,
                   help="with --mix-alpha: the share of pairs without a mix (the prompt decides)")
    p.add_argument("--experts-per-group", type=experts_int, default=d.experts_per_group)
    p.add_argument("--null-experts", type=some_experts_int, default=d.null_experts)
    p.add_argument("--top-k", type=experts_int, default=d.top_k)
    p.add_argument("--rank", type=width_int, default=d.rank, help="LoRA rank r of each expert")
    p.add_argument("--alpha", type=positive_float, default=d.alpha, help="lora_alpha")
    p.add_argument("--target-modules", nargs="+", default=[d.target_modules],
                   help="module names (q_proj v_proj, or q_proj,v_proj), one regex over whole "
                        "names, or all-linear")
    p.add_argument("--group-loss-coef", type=nonnegative_float, default=d.group_loss_coef,
                   help="weight of PMoL's group soft loss (routing each pair's prompt to its "
                        "preference's experts)")
    p.add_argument("--aux-loss-coef", type=nonnegative_float, default=d.aux_loss_coef)
    p.add_argument("--hidden", type=width_int, default=d.hidden, help="built-in base model width")
    p.add_argument("--layers", type=layers_int, default=d.layers, help="built-in base model depth")
    p.add_argument("--eval-fraction", type=open_fraction, default=d.eval_fraction)
    p.add_argument("--checkpoint-every", type=count_int, default=d.checkpoint_every)
    add_progress(p)
    p.add_argument("--seed", type=seed_int, default=d.seed)
    add_json(p)
    p.set_defaults(func=cmd_train_pmol, needs=lambda args: ("hf",) + data_extras(args.data))
