"""The `moe-ext` command line. Each command lives in its own module, which registers its
arguments; the jobs themselves are library functions (moe_ext.pmol.job, moe_ext.reward.job,
moe_ext.demo), so the commands stay thin."""
from __future__ import annotations

import argparse

from . import bench, convert, demo, export, generate, info, pmol, reward, serve
from .common import fail, missing_extras

COMMANDS = (info, demo, pmol, reward, generate, convert, export, serve, bench)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: "moe-ext CMD: error: argument --OPTION: ..." and a
    pointer to --help instead of the whole usage (the subcommands' parsers are of this
    class too)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def make_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="moe-ext", description="Mixture-of-LoRA-experts kernels and tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    needs = getattr(args, "needs", None)
    message = missing_extras(args.command, needs(args)) if needs else None
    if message:  # before any work: not after minutes of training
        return fail(message)
    try:
        return args.func(args)
    except ImportError as err:  # an optional extra that this command needs
        return fail(f"{err.name or err} is not installed; pip install 'moe_ext[hf,onnx,serve,minilm]' "
                    f"(or the package named) to use `moe-ext {args.command}`")

