"""Reward-model folders: the config records the checksums of the weights and of the extra
JSON files saved with them; a load checks the config's fields and the tensors (shape from
a model built on the meta device, so nothing is allocated for a bad config) and names the
file and the field."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_ext import reward
from moe_ext.utils.io import sha256_file


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = reward.SparseMoERewardModel(6, 5, num_experts=3, top_k=2)
    reward.save_reward_model(model, str(tmp_path), extra_json={"train_info.json": {"a": 1}})
    return tmp_path, model


def edit_config(folder, edit):
    path = folder / "reward_config.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def test_round_trip_records_checksums_of_weights_and_extra_files(saved):
    folder, model = saved
    meta = json.loads((folder / "reward_config.json").read_text())
    assert meta["sha256"] == {name: sha256_file(str(folder / name)) for name in
                              ("reward_model.safetensors", "train_info.json")}
    again = reward.load_reward_model(str(folder))
    x, y = torch.randn(4, 6), torch.randn(4, 5)
    torch.testing.assert_close(again(x, y), model(x, y))


@pytest.mark.parametrize("field,value,match", [
    ("num_experts", 10**9, "but the model expects"),  # no allocation: meta device
    ("num_experts", "3", "num_experts must be an int"),
    ("top_k", True, "top_k must be an int"),
    ("router_temperature", float("nan"), "router_temperature"),
    ("expert_hidden", 0, "expert_hidden"),
    ("prompt_dim", 10**100, "prompt_dim must be an int"),  # was a TypeError inside torch
    ("num_users", -(10**30), "num_users must be an int"),
])
def test_bad_config_is_refused_naming_file_and_field(saved, field, value, match):
    folder, _ = saved
    edit_config(folder, lambda m: m["config"].__setitem__(field, value))
    with pytest.raises(ValueError, match=match) as err:
        reward.load_reward_model(str(folder))
    assert "reward_" in str(err.value)


def test_bad_tensors_and_torn_files_are_named(saved):
    folder, _ = saved
    (folder / "train_info.json").write_text('{"a": 2}')  # e.g. from another save
    with pytest.raises(ValueError, match="train_info.json does not match the SHA-256"):
        reward.load_reward_model(str(folder))
    weights = str(folder / "reward_model.safetensors")
    tensors = load_file(weights)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] * float("inf")
    save_file(tensors, weights)
    edit_config(folder, lambda m: m.pop("sha256"))  # an older save: no checksums
    with pytest.raises(ValueError, match=f"{key} holds NaN or infinite values"):
        reward.load_reward_model(str(folder))


def test_a_config_that_is_not_an_object_is_named(saved):
    folder, _ = saved
    (folder / "reward_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        reward.load_reward_model(str(folder))


def test_deeply_nested_config_is_a_value_error_naming_the_file(saved):
    """JSON nested 100,000 deep raised RecursionError (issue 30)."""
    folder, _ = saved
    (folder / "reward_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="reward_config.json: JSON nested too deeply"):
        reward.load_reward_model(str(folder))
