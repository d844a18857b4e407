"""Saving and loading a sparse MoE reward model without pickle: reward_config.json (the
RewardConfig) and reward_model.safetensors (the weights), each written atomically."""
from __future__ import annotations

import os

from safetensors.torch import load_file, save_file

from ..utils.io import atomic_write, read_json, write_json
from .model import RewardConfig, SparseMoERewardModel

FORMAT_VERSION = 1
CONFIG_NAME = "reward_config.json"
WEIGHTS_NAME = "reward_model.safetensors"


def save_reward_model(model: SparseMoERewardModel, directory: str) -> None:
    """directory/reward_config.json + directory/reward_model.safetensors."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda t: save_file(state, t))
    write_json(os.path.join(directory, CONFIG_NAME),
               {"format_version": FORMAT_VERSION, "class": type(model).__name__,
                "config": model.config.to_dict()})


def load_reward_model(directory: str) -> SparseMoERewardModel:
    """The model saved by save_reward_model in `directory`."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!r}")
    meta = read_json(path)
    if meta.get("format_version") != FORMAT_VERSION or meta.get("class") != "SparseMoERewardModel":
        raise ValueError(f"{path}: not a moe_ext SparseMoERewardModel checkpoint (format 1)")
    model = SparseMoERewardModel.from_config(RewardConfig.from_dict(meta["config"]))
    model.load_state_dict(load_file(os.path.join(directory, WEIGHTS_NAME)))
    return model
