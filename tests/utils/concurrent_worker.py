"""Worker of test_concurrent_saves.py: several writers and one reader on one folder, with
writers SIGKILLed at random times.

    python concurrent_worker.py KIND FOLDER LOADS WRITERS KILL_EVERY SEED

KIND is "adapter" (save_molora / load_molora) or "reward" (save_reward_model with a
train_info.json / load_reward_run). The worker imports torch and moe_ext once, then
forks WRITERS writer processes, each saving in an endless loop a model whose every weight
and whose config (lora_alpha, router_temperature, train_info.json) hold one value unique
to that save. The worker itself is the reader: it loads the folder LOADS times and checks
that each load is one whole save (every value equal); every KILL_EVERY-th load it
SIGKILLs a random writer and forks a new one in its place. It prints one JSON line:
{"loads", "mixed", "errors", "kills", "saves_seen"}."""
import dataclasses
import json
import os
import random
import signal
import sys

import torch
from torch import nn

from moe_ext.molora import MoLoRAConfig, get_molora_model, load_molora, save_molora
from moe_ext.reward import SparseMoERewardModel, save_reward_model
from moe_ext.reward.job import load_reward_run

CONFIG = MoLoRAConfig(r=2, lora_alpha=1.0, num_experts=2, top_k=1, target_modules=["proj"])


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 32)


def fill(module: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(value)


def save(kind: str, folder: str, model: nn.Module, value: float) -> None:
    if kind == "adapter":
        model.molora_config = dataclasses.replace(CONFIG, lora_alpha=value)
        fill(model, value)
        save_molora(model, folder)
    else:
        model.config = dataclasses.replace(model.config, router_temperature=value)
        fill(model, value)
        save_reward_model(model, folder, extra_json={"train_info.json": {"value": value}})


def load_value(kind: str, folder: str) -> float:
    """The value of the save a load returns; AssertionError when it mixes saves."""
    if kind == "adapter":
        model = load_molora(Tiny(), folder)
        value = model.molora_config.lora_alpha
        tensors = [p for n, p in model.named_parameters() if "lora_" in n or "router" in n]
    else:
        model, info = load_reward_run(folder)  # the model and its train_info.json
        value = model.config.router_temperature
        assert info["value"] == value, "train_info.json from another save"
        tensors = list(model.parameters())
    assert all(bool(torch.all(t == value)) for t in tensors), "weights from another save"
    return value


def writer(kind: str, folder: str, model: nn.Module, ident: int) -> None:
    j = 0
    while True:  # until killed
        j += 1
        save(kind, folder, model, float(ident * 100_000 + j))


def main() -> None:
    kind, folder = sys.argv[1], sys.argv[2]
    loads, writers, kill_every, seed = (int(v) for v in sys.argv[3:7])
    torch.set_num_threads(1)
    model = get_molora_model(Tiny(), CONFIG) if kind == "adapter" else SparseMoERewardModel(8, 8, 2)
    save(kind, folder, model, 1.0)  # a first save, and the lazy imports done before forking
    rng, idents = random.Random(seed), iter(range(1, 10_000))

    def spawn() -> int:
        ident = next(idents)
        pid = os.fork()
        if pid == 0:
            try:
                writer(kind, folder, model, ident)
            finally:
                os._exit(1)
        return pid

    pids = [spawn() for _ in range(writers)]
    result = {"loads": 0, "mixed": 0, "errors": [], "kills": 0, "saves_seen": set()}
    try:
        for i in range(loads):
            try:
                result["saves_seen"].add(load_value(kind, folder))
            except AssertionError as err:
                result["mixed"] += 1
                result["errors"].append(f"mixed: {err}")
            except (OSError, ValueError) as err:
                result["errors"].append(f"{type(err).__name__}: {err}")
            result["loads"] += 1
            if kill_every and (i + 1) % kill_every == 0:
                victim = rng.randrange(len(pids))
                os.kill(pids[victim], signal.SIGKILL)
                os.waitpid(pids[victim], 0)
                result["kills"] += 1
                pids[victim] = spawn()
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    result["saves_seen"] = len(result["saves_seen"])
    result["errors"] = result["errors"][:5] + ([f"... {len(result['errors'])} in all"]
                                               if len(result["errors"]) > 5 else [])
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
