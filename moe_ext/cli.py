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
    kernels = {}
    for key in ("CPU", "CUDA"):
        kernels[key] = [n for n in op_names
                        if torch._C._dispatch_has_kernel_for_dispatch_key(f"moe_ext::{n}", key)]
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
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
