"""SIGKILL during saves: a worker saves a MoLoRA adapter, a reward model (with its
train_info.json) and a training checkpoint in a loop, save i carrying i in its weights and
in its config; it is killed at random times. After each kill every load must return save
i - 1 or save i whole (weights and config agreeing), never a mix or an error, and the next
save must leave no temporaries behind."""
import os
import random
import subprocess
import sys
import time

import torch
from torch import nn

from moe_ext.molora import load_molora
from moe_ext.reward import load_reward_model
from moe_ext.training import load_checkpoint
from moe_ext.utils.io import read_json, write_text

sys.path.insert(0, os.path.dirname(__file__))
from save_kill_worker import Tiny, save_round  # noqa: E402

KILLS = 24


def saved_values(folder: str) -> dict[str, float]:
    """The save number each artefact in `folder` holds, checked whole (AssertionError for a
    mix of two saves)."""
    model = load_molora(Tiny(), os.path.join(folder, "adapter"))
    alpha = model.molora_config.lora_alpha
    for name, p in model.named_parameters():
        if "lora_" in name or "router" in name:
            assert torch.all(p == alpha), f"adapter: {name} is not from save {alpha}"
    reward_dir = os.path.join(folder, "reward")
    reward = load_reward_model(reward_dir)
    temperature = reward.config.router_temperature
    assert all(torch.all(p == temperature) for p in reward.parameters()), "reward: mixed save"
    assert read_json(os.path.join(reward_dir, "train_info.json"))["i"] == temperature
    linear = nn.Linear(64, 64)
    step, history = load_checkpoint(os.path.join(folder, "checkpoint"), linear,
                                    torch.optim.SGD(linear.parameters(), lr=0.1))
    assert torch.all(linear.weight == step) and history == [{"step": step}]
    return {"adapter": alpha, "reward": temperature, "checkpoint": float(step)}


def leftovers(folder: str) -> list[str]:
    """Temporaries and pending files in the three saved folders (the worker's own "next"
    counter beside them is not under test)."""
    return [os.path.join(root, f) for part in ("adapter", "reward", "checkpoint")
            for root, dirs, files in os.walk(os.path.join(folder, part)) for f in files + dirs
            if f.startswith((".tmp", ".pending-"))]  # ours and the libraries (.tmpXXXXXX)


def new_parts():
    from moe_ext.molora import MoLoRAConfig, get_molora_model
    from moe_ext.reward import SparseMoERewardModel

    adapter = get_molora_model(Tiny(), MoLoRAConfig(r=2, num_experts=2, top_k=1,
                                                    target_modules=["proj"]))
    linear = nn.Linear(64, 64)
    return adapter, SparseMoERewardModel(16, 16, 2), linear, torch.optim.SGD(linear.parameters(), lr=0.1)


def test_sigkill_during_saves_leaves_old_or_new_save_and_next_save_cleans_up(tmp_path):
    folder = str(tmp_path)
    parts = new_parts()
    save_round(folder, 1, *parts)  # save i holds i (> 0: alpha and temperature are positive)
    write_text(os.path.join(folder, "next"), "2")
    worker = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__),
                                                            "save_kill_worker.py")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert worker.stdout.readline().strip() == "ready"
    rng = random.Random(0)
    seen = {"old": 0, "new": 0, "staging folders": 0}
    try:
        for _ in range(KILLS):
            worker.stdin.write(f"go {folder}\n")
            worker.stdin.flush()
            line = worker.stdout.readline()
            assert line.startswith("pid "), line
            pid = int(line.split()[1])
            for _ in range(rng.randint(0, 2)):  # let some rounds finish, kill within the next
                assert worker.stdout.readline().startswith("saved")
            time.sleep(rng.uniform(0, 0.03))
            os.kill(pid, 9)
            while worker.stdout.readline().strip() != "reaped":
                pass
            n = int(open(os.path.join(folder, "next")).read())
            seen["staging folders"] += sum(os.path.basename(f).startswith(".pending-")
                                           for f in leftovers(folder))
            for kind, value in saved_values(folder).items():
                assert value in (n - 1, n), f"{kind}: save {value} after a kill in save {n}"
                seen["old" if value == n - 1 else "new"] += 1
    finally:
        worker.stdin.close()
        worker.kill()
        worker.wait()
    save_round(folder, 10_000, *parts)
    assert leftovers(folder) == []
    assert set(saved_values(folder).values()) == {10_000}
    print(f"{KILLS} kills: loads found the old save {seen['old']} times, the new "
          f"{seen['new']}; {seen['staging folders']} staging folders left by a kill")
