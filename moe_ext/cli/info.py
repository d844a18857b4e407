"""`moe-ext info`: what was built."""
from __future__ import annotations

import json

from ..info import build_info
from .common import add_json


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


def register(sub) -> None:
    p = sub.add_parser("info", help="what was built: CPU/CUDA kernels, CUDA archs, versions")
    add_json(p, "machine-readable JSON")
    p.set_defaults(func=cmd_info)
