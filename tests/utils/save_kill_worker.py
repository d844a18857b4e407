"""Worker of test_save_kill.py: imports torch and moe_ext once, builds the models and
saves them once (so a child starts saving at once), then for each line
"go FOLDER" read on stdin forks a child that saves a MoLoRA adapter, a reward model and a
training checkpoint into FOLDER in an endless loop, save i carrying the value i in both
its weights and its config, and prints "pid PID"; the test SIGKILLs the child at a random
time, the worker reaps it and prints "reaped". A child prints "saved I" after each round."""
import dataclasses
import os
import sys
import tempfile

import torch
from torch import nn

from moe_ext.molora import MoLoRAConfig, get_molora_model, save_molora
from moe_ext.reward import SparseMoERewardModel, save_reward_model
from moe_ext.training import save_checkpoint
from moe_ext.utils.io import write_text

CONFIG = MoLoRAConfig(r=2, lora_alpha=1.0, num_experts=2, top_k=1, target_modules=["proj"])


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 64)


def fill(module: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(value)


def save_round(folder: str, i: int, adapter: nn.Module, reward: nn.Module, linear: nn.Module,
               optimizer) -> None:
    adapter.molora_config = dataclasses.replace(CONFIG, lora_alpha=float(i))
    fill(adapter, float(i))
    save_molora(adapter, os.path.join(folder, "adapter"))
    reward.config = dataclasses.replace(reward.config, router_temperature=float(i))
    fill(reward, float(i))
    save_reward_model(reward, os.path.join(folder, "reward"), extra_json={"train_info.json": {"i": i}})
    fill(linear, float(i))
    save_checkpoint(os.path.join(folder, "checkpoint"), i, linear, optimizer, [{"step": i}])


def child(folder: str, parts) -> None:
    i = int(open(os.path.join(folder, "next")).read())
    while True:
        save_round(folder, i, *parts)
        print(f"saved {i}", flush=True)
        i += 1
        write_text(os.path.join(folder, "next"), str(i))


def main() -> None:
    torch.set_num_threads(1)
    linear = nn.Linear(64, 64)
    parts = (get_molora_model(Tiny(), CONFIG), SparseMoERewardModel(16, 16, 2), linear,
             torch.optim.SGD(linear.parameters(), lr=0.1))
    with tempfile.TemporaryDirectory() as scratch:  # warm up: lazy imports, first-call costs
        save_round(scratch, 1, *parts)
    print("ready", flush=True)
    for line in sys.stdin:
        folder = line.split(maxsplit=1)[1].strip()
        pid = os.fork()
        if pid == 0:
            try:
                child(folder, parts)
            finally:
                os._exit(1)
        print(f"pid {pid}", flush=True)
        os.waitpid(pid, 0)
        print("reaped", flush=True)


if __name__ == "__main__":
    main()
