"""`moe-ext train-pmol`."""
from __future__ import annotations

import json
import os

from .cli_util import fail as _fail


def cmd_train_pmol(args) -> int:
    """DPO + expert-group + balance losses on a tiny Llama-style LM built from a config."""
    from . import data, pmol
    from .model import atomic_write, get_molora_model, save_molora
    from .training import TrainConfig, init_distributed

    if args.data:
        try:
            examples = data.load_preference_jsonl(args.data)
        except (OSError, ValueError) as err:
            return _fail(str(err))
        tokenizer = data.WordTokenizer.from_examples(examples)
    else:
        examples = data.synthetic_preference_data(args.synthetic_size, seed=args.seed)
        tokenizer = data.synthetic_tokenizer()
    groups = sorted({e.preference for e in examples})
    n_eval = max(1, int(len(examples) * args.eval_fraction))
    if len(examples) - n_eval < 1:
        return _fail(f"need at least 2 examples, got {len(examples)}")
    train_ex, eval_ex = examples[n_eval:], examples[:n_eval]
    try:
        cfg = pmol.pmol_config(groups, args.experts_per_group, args.null_experts, r=args.rank,
                               lora_alpha=args.alpha, top_k=args.top_k,
                               target_modules=args.target_modules,
                               group_loss_coef=args.group_loss_coef,
                               router_aux_loss_coef=args.aux_loss_coef)
        train_cfg = TrainConfig(steps=args.steps, grad_accum=args.grad_accum, lr=args.lr,
                                seed=args.seed, checkpoint_dir=os.path.join(args.output, "checkpoint"),
                                checkpoint_every=args.checkpoint_every, resume=not args.no_resume,
                                progress=not args.no_progress and not args.json)
        dpo = pmol.DPOConfig(beta=args.beta, label_smoothing=args.label_smoothing)
    except ValueError as err:
        return _fail(str(err))
    rank, _ = init_distributed()
    base = pmol.build_tiny_causal_lm(len(tokenizer), hidden=args.hidden, layers=args.layers,
                                     seed=args.seed)
    if rank == 0:
        base.save_pretrained(os.path.join(args.output, "base_model"))
    model = get_molora_model(base, cfg)
    result = pmol.train_pmol(model, train_ex, tokenizer, train_cfg, dpo, batch_size=args.batch_size)
    report = pmol.evaluate_pmol(model, eval_ex, tokenizer, beta=args.beta)
    metrics = {"train": result.history[-1] if result.history else {}, "eval": report,
               "resumed_from": result.resumed_from, "groups": groups}
    if rank == 0:
        save_molora(model, os.path.join(args.output, "adapter"))
        atomic_write(os.path.join(args.output, "tokenizer.json"),
                     lambda tmp: open(tmp, "w").write(json.dumps(tokenizer.to_dict())))
        atomic_write(os.path.join(args.output, "metrics.json"),
                     lambda tmp: open(tmp, "w").write(json.dumps(metrics, indent=2)))
        if args.json:
            print(json.dumps(metrics))
        else:
            print(f"saved adapter to {os.path.join(args.output, 'adapter')}")
            for name, row in report.items():
                extra = (f"  routing accuracy {row['routing_accuracy']:.3f}"
                         if "routing_accuracy" in row else "")
                print(f"{name:>10}: DPO accuracy {row['dpo_accuracy']:.3f}{extra}  (n={row['n']})")
    return 0
