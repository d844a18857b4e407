"""DeepSpeed ZeRO-3 with bf16 autocast on 2 CPU ranks (gloo): a MoLoRA model trains (the
dense strategy under autocast with ZeRO-3's module hooks used to fail at the first forward:
"lora_dense_expand_cpu" not implemented for 'BFloat16'), save_molora gathers the
partitioned adapter (it used to write empty tensors) and it reloads exactly into a ZeRO-3
model and an unsharded one (zero3_worker.py)."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

from test_fsdp import assert_same, free_port, group  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def test_zero3_bf16_autocast_trains_saves_and_reloads_exactly(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           os.path.join(HERE, "zero3_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert torch.isfinite(r0["aux_loss"]).all() and torch.isfinite(r1["aux_loss"]).all()
    trained = group(r0, "trained")
    assert_same(trained, group(r1, "trained"))
    assert all(v.numel() > 0 for v in trained.values())
    assert any(k.endswith(".lora_B") and v.abs().sum() > 0 for k, v in trained.items())
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert_same(trained, saved)
    for report in (r0, r1):
        assert_same(trained, group(report, "zero3_load"))
    assert_same(trained, group(r0, "plain_load"))
