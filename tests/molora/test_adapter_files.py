"""Adapter folders: the config records the weights' SHA-256 and a load verifies it; a load
checks the config's types and ranges and the tensors' shapes, dtypes and finiteness before
it touches the model, so a failed load leaves the model exactly as it was; adapters
without a checksum (PEFT's, older moe_ext versions') still load."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import moe_ext
from moe_ext import MoLoRAConfig
from moe_ext.utils.io import sha256_file

CONFIG = MoLoRAConfig(r=2, lora_alpha=4.0, num_experts=3, num_null_experts=1, top_k=2,
                      target_modules=["up", "down"], expert_groups={"a": [0, 1], "b": [2]})


class Base(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.fixture
def saved(tmp_path):
    model = moe_ext.get_molora_model(Base(), CONFIG)
    with torch.no_grad():
        for layer in moe_ext.molora_layers(model).values():
            layer.lora_B.normal_()
    moe_ext.save_molora(model, str(tmp_path))
    return tmp_path


def edit_config(folder, edit):
    path = folder / "adapter_config.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def edit_weights(folder, edit):
    """Rewrites the tensors and the checksum with them (a consistent but bad adapter)."""
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))
    edit_config(folder, lambda m: m["sha256"].update({path.name: sha256_file(str(path))}))


def cfg(key, value):
    return lambda m: m["moe_ext_config"].__setitem__(key, value)


BAD_CONFIGS = [
    (cfg("num_experts", 1e9), "num_experts"),
    (cfg("num_experts", 10**9), "has shape"),  # checked against the file: nothing allocated
    (cfg("num_experts", "4"), "num_experts"),
    (cfg("r", True), "MoLoRAConfig.r"),
    (cfg("lora_alpha", float("inf")), "lora_alpha"),
    (cfg("lora_alpha", float("nan")), "lora_alpha"),
    (cfg("router_temperature", 0), "router_temperature"),
    (cfg("normalize_weights", "no"), "normalize_weights"),
    (cfg("top_k", 9), "top_k"),
    (cfg("expert_groups", {"a": ["0"]}), "expert_groups"),
    (cfg("expert_groups", {"a": [0, 0]}), "expert_groups"),
    (cfg("expert_groups", [0]), "expert_groups"),
    (cfg("target_modules", "(bad"), "target_modules"),
    (cfg("group_loss_coef", -1), "group_loss_coef"),
    (cfg("unknown_field", 1), "unknown_field"),
    (lambda m: m.__setitem__("moe_ext_config", None), "moe_ext_config"),
    (lambda m: m.__setitem__("layers", "up"), "layers"),
    (lambda m: m.__setitem__("base_model_class", 3), "base_model_class"),
    (lambda m: m.__setitem__("sha256", {"../x": "00"}), "leaves the folder"),
    (lambda m: m.__setitem__("sha256", "abc"), "sha256"),
]
BAD_WEIGHTS = [
    (lambda t: t.__setitem__("up.lora_A", t["up.lora_A"] * float("nan")), "up.lora_A holds NaN"),
    (lambda t: t.__setitem__("up.lora_B", t["up.lora_B"].to(torch.int32)), "up.lora_B has dtype"),
    (lambda t: t.__setitem__("down.router.weight", torch.zeros(9, 16)), "down.router.weight has shape"),
    (lambda t: t.pop("down.lora_A"), "missing tensor 'down.lora_A'"),
]


def assert_fails_and_leaves_model(folder, match):
    model = Base()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=match) as err:
        moe_ext.load_molora(model, str(folder))
    assert "adapter_" in str(err.value)  # names the file
    assert [type(m) for m in model.modules()] == types
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert all(p.requires_grad for p in model.parameters())
    assert not hasattr(model, "molora_config")


@pytest.mark.parametrize("edit,match", BAD_CONFIGS, ids=[m for _, m in BAD_CONFIGS])
def test_bad_config_fails_naming_field_and_file_and_leaves_model(saved, edit, match):
    edit_config(saved, edit)
    assert_fails_and_leaves_model(saved, match)


@pytest.mark.parametrize("edit,match", BAD_WEIGHTS, ids=[m for _, m in BAD_WEIGHTS])
def test_bad_weights_fail_naming_tensor_and_file_and_leave_model(saved, edit, match):
    edit_weights(saved, edit)
    assert_fails_and_leaves_model(saved, match)


def test_weights_that_do_not_match_their_checksum_are_named(saved):
    path = saved / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert_fails_and_leaves_model(saved, "adapter_model.safetensors does not match the SHA-256")
    path.write_bytes(b"not safetensors")
    edit_config(saved, lambda m: m.pop("sha256"))
    assert_fails_and_leaves_model(saved, "not a readable safetensors file")


def test_adapter_without_checksum_still_loads(saved):
    want = moe_ext.load_molora(Base(), str(saved))(torch.ones(2, 8))
    edit_config(saved, lambda m: m.pop("sha256"))  # as moe_ext <= 0.x and converters wrote it
    torch.testing.assert_close(moe_ext.load_molora(Base(), str(saved))(torch.ones(2, 8)), want)


def test_save_records_the_checksum_and_leaves_only_its_files(saved):
    meta = json.loads((saved / "adapter_config.json").read_text())
    assert meta["sha256"] == {"adapter_model.safetensors":
                              sha256_file(str(saved / "adapter_model.safetensors"))}
    assert sorted(os.listdir(saved)) == ["adapter_config.json", "adapter_model.safetensors"]
