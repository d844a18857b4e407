"""Shared helpers of the command line: errors that exit with status 2, the options several
commands take, and job dataclasses filled from parsed options."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def fail(message: str) -> int:
    """Prints an error naming what is wrong and returns exit status 2."""
    print(f"moe-ext: error: {message}", file=sys.stderr)
    return 2


def add_json(parser: argparse.ArgumentParser, what: str = "the metrics") -> None:
    parser.add_argument("--json", action="store_true", help=f"print {what} as one JSON line")


def add_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_source(parser: argparse.ArgumentParser, data_help: str, synthetic_help: str) -> None:
    """--data FILE or --synthetic, one of them required."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help=data_help)
    src.add_argument("--synthetic", action="store_true", help=synthetic_help)


def job_from_args(job_class, args: argparse.Namespace, **overrides):
    """An instance of the dataclass `job_class` with every field that `args` has."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(job_class)
              if hasattr(args, f.name)}
    return job_class(**{**values, **overrides})


def print_json(value) -> None:
    print(json.dumps(value))


def quiet_transformers() -> None:
    """No loading bars or advisory warnings from transformers in the CLI's output."""
    try:
        import transformers
    except ImportError:
        return
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
