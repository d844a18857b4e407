"""FSDP2 (fully_shard) on 2 CPU ranks with gloo: save_molora, save_pretrained and
save_reward_model gather the sharded tensors (every rank calls them, rank 0 writes) and
reload exactly, into an unsharded model and into a sharded one (fsdp_worker.py)."""
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")
if not torch.distributed.is_available():
    pytest.skip("torch without distributed", allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           os.path.join(HERE, "fsdp_worker.py"), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, [load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1)]


def group(report, prefix):
    return {k[len(prefix) + 1:]: v for k, v in report.items() if k.startswith(prefix + ".")}


def assert_same(want, got):
    assert sorted(want) == sorted(got) and want
    for key in want:
        assert torch.equal(want[key], got[key]), key


def test_adapter_saves_gather_the_full_state_and_reload_exactly(ranks):
    out, (r0, r1) = ranks
    trained = group(r0, "trained")
    assert_same(trained, group(r1, "trained"))
    assert any(k.endswith(".lora_B") and v.abs().sum() > 0 for k, v in trained.items())
    assert_same(trained, group(r0, "save_molora"))
    assert_same(trained, group(r0, "save_pretrained"))  # is_main_process=False on rank 1
    for report in (r0, r1):  # loaded into a sharded model, each rank taking its shard
        assert_same(trained, group(report, "sharded_load"))
    assert sorted(os.listdir(out / "save_molora")) == ["adapter_config.json",
                                                       "adapter_model.safetensors"]


def test_reward_models_save_gathered_and_reload_exactly(ranks):
    _, (r0, r1) = ranks
    for name in ("reward", "backbone_reward"):
        saved = group(r0, name)
        assert_same(saved, group(r1, name))
        assert_same(saved, group(r0, f"{name}_loaded"))
