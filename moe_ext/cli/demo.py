"""`moe-ext demo`: the main job end to end on built-in data (moe_ext/demo.py)."""
from __future__ import annotations

import os

from ..demo import run_demo, summary_table
from .common import add_json, check_writable, fail, print_json, quiet_transformers


def cmd_demo(args) -> int:
    try:
        check_writable(args.output, "--output")
    except ValueError as err:
        return fail(str(err))
    quiet_transformers()
    log = (lambda msg: None) if args.json else (lambda msg: print(f"== {msg}", flush=True))
    summary = run_demo(args.output, quick=args.quick, progress=not args.json, log=log)
    if args.json:
        print_json(summary)
    else:
        print()
        print(summary_table(summary))
        print(f"\nreport, plots and ONNX models in {os.path.abspath(args.output)}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "demo", help="the main job end to end on built-in data (no download)",
        description="Train a sparse MoE reward model and adapt it to users, train a PMoL "
                    "adapter, export both to ONNX and check them on onnxruntime; writes a "
                    "report, plots and the models to --output.")
    p.add_argument("--quick", action="store_true", help="smaller run, under 2 minutes")
    p.add_argument("--output", default="out/demo")
    add_json(p, "the summary")
    p.set_defaults(func=cmd_demo, needs=lambda args: ("hf", "onnx"))
