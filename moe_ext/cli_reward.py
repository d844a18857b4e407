"""`moe-ext train-rm` and `moe-ext adapt`."""
from __future__ import annotations

import json
import os

import torch

from .cli_util import fail as _fail


def _load_text_pairs(path: str, encoder: str):
    """JSONL rows with prompt, chosen, rejected (optional integer `category`) -> embeddings."""
    from .embed import embed

    if not os.path.isfile(path):
        raise ValueError(f"data file not found: {path!r}")
    rows = []
    for lineno, line in enumerate(open(path), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not all(isinstance(row.get(k), str) for k in ("prompt", "chosen", "rejected")):
                raise ValueError(f"{path}:{lineno}: needs string fields prompt, chosen, rejected")
            rows.append(row)
    if len(rows) < 2:
        raise ValueError(f"{path}: need at least 2 pairs, got {len(rows)}")
    import torch as _torch

    cats = [r.get("category") for r in rows]
    label = _torch.tensor(cats) if all(isinstance(c, int) for c in cats) else None
    return (embed([r["prompt"] for r in rows], encoder), embed([r["chosen"] for r in rows], encoder),
            embed([r["rejected"] for r in rows], encoder), label)


def cmd_train_rm(args) -> int:
    """Train a sparse MoE reward model on preference pairs (embedding mode)."""
    from . import reward, reward_data
    from .model import atomic_write

    torch.manual_seed(args.seed)
    if args.data:
        try:
            prompt, chosen, rejected, label = _load_text_pairs(args.data, args.encoder)
        except ValueError as err:
            return _fail(str(err))
        source = {"kind": "text", "encoder": args.encoder, "data": os.path.abspath(args.data)}
    else:
        task = reward_data.make_task(num_criteria=args.experts, seed=args.seed)
        pairs = reward_data.category_pairs(task, args.synthetic_pairs, seed=args.seed + 1)
        prompt, chosen, rejected, label = pairs.prompt, pairs.chosen, pairs.rejected, pairs.label
        source = {"kind": "synthetic", "task_seed": args.seed, "criteria": args.experts}
    n_test = max(1, int(len(prompt) * args.test_fraction))
    tr, te = slice(n_test, None), slice(0, n_test)
    try:
        model = reward.SparseMoERewardModel(prompt.shape[1], chosen.shape[1], args.experts,
                                            args.top_k, args.expert_hidden)
        history = reward.fit(model, prompt[tr], chosen[tr], rejected[tr], epochs=args.epochs,
                             batch_size=args.batch_size, lr=args.lr, objective=args.objective,
                             sparsity_coef=args.sparsity_coef, balance_coef=args.balance_coef,
                             diversity_coef=args.diversity_coef, seed=args.seed,
                             progress=not args.no_progress and not args.json)
    except ValueError as err:
        return _fail(str(err))
    metrics = {"train": history[-1], "test_accuracy": reward.pairwise_accuracy(
        model, prompt[te], chosen[te], rejected[te]), "test_pairs": n_test,
        "expert_use": reward.average_routing(model, prompt[te]).tolist()}
    if label is not None:
        purity, nmi = reward.purity_nmi(model.route(prompt[te]).argmax(-1), label[te])
        metrics.update(router_purity=purity, router_nmi=nmi)
    reward.save_reward_model(model, args.output)
    atomic_write(os.path.join(args.output, "train_info.json"),
                 lambda tmp: open(tmp, "w").write(json.dumps({"source": source, "metrics": metrics},
                                                             indent=2)))
    if args.json:
        print(json.dumps(metrics))
    else:
        print(f"saved reward model to {args.output}")
        print(f"test pairwise accuracy {metrics['test_accuracy']:.3f} on {n_test} pairs")
        if label is not None:
            print(f"router purity {metrics['router_purity']:.3f}, NMI {metrics['router_nmi']:.3f}")
    return 0


def cmd_adapt(args) -> int:
    """Adapt a trained reward model to one user from a few labelled pairs."""
    from . import reward, reward_data
    from .model import atomic_write

    try:
        model = reward.load_reward_model(args.model)
        info = json.load(open(os.path.join(args.model, "train_info.json")))
    except (OSError, ValueError) as err:
        return _fail(str(err))
    source = info["source"]
    truth = None
    if args.data:
        if source["kind"] != "text":
            return _fail("this reward model was trained on synthetic embeddings; use --synthetic-user")
        try:
            prompt, chosen, rejected, _ = _load_text_pairs(args.data, source["encoder"])
        except ValueError as err:
            return _fail(str(err))
        few = (prompt[:args.pairs], chosen[:args.pairs], rejected[:args.pairs])
        held = (prompt[args.pairs:], chosen[args.pairs:], rejected[args.pairs:])
    else:
        if source["kind"] != "synthetic":
            return _fail("--synthetic-user needs a reward model trained with --synthetic")
        task = reward_data.make_task(num_criteria=source["criteria"], seed=source["task_seed"])
        truth = reward_data.sample_users(task, args.synthetic_user + 1, seed=1234)[args.synthetic_user]
        p = reward_data.user_pairs(task, truth, args.pairs, seed=10 + args.synthetic_user)
        q = reward_data.user_pairs(task, truth, 500, seed=20_000 + args.synthetic_user)
        few, held = (p.prompt, p.chosen, p.rejected), (q.prompt, q.chosen, q.rejected)
    try:
        weights = reward.adapt(model, *few, method=args.method, eta=args.eta)
    except ValueError as err:
        return _fail(str(err))
    prior = reward.average_routing(model, few[0])
    result = {"method": args.method, "pairs": int(few[0].shape[0]), "weights": weights.tolist(),
              "mean_routing": prior.tolist(), "shift": (weights - prior).tolist()}
    if held[0].shape[0] > 0:
        result["heldout_accuracy_adapted"] = reward.pairwise_accuracy(model, *held, weights)
        result["heldout_accuracy_routed"] = reward.pairwise_accuracy(model, *held)
        result["heldout_pairs"] = int(held[0].shape[0])
    if truth is not None:
        result["true_profile_over_criteria"] = truth.tolist()
    if args.output:
        atomic_write(args.output, lambda tmp: open(tmp, "w").write(json.dumps(result, indent=2)))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"user weights over {len(weights)} experts ({args.method}, {result['pairs']} pairs):")
        for e, (w, s) in enumerate(zip(result["weights"], result["shift"])):
            print(f"  expert {e}: weight {w:.3f}  shift {s:+.3f}  " + "#" * int(round(w * 40)))
        if "heldout_accuracy_adapted" in result:
            print(f"held-out accuracy: adapted {result['heldout_accuracy_adapted']:.3f}, "
                  f"routed {result['heldout_accuracy_routed']:.3f} ({result['heldout_pairs']} pairs)")
    return 0
