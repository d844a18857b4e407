"""The `moe-ext` command line. `moe-ext info` tells what was built."""
from __future__ import annotations

import argparse
import json
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


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-ext", description="Mixture-of-LoRA-experts kernels and tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="what was built: CPU/CUDA kernels, CUDA archs, versions")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
