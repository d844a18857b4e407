"""Facts about this run (date, commit, machine, versions) that benchmark and experiment
results are committed with."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess

import torch

from ..version import __version__


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit(folder: str = ".") -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=folder)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def run_facts(folder: str = ".") -> dict:
    """date, commit (of the git checkout at `folder`), CPU, cores, threads, GPU, versions."""
    return {
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(folder),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "moe_ext": __version__,
        "python": platform.python_version(),
    }
