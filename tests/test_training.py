"""The shared training loop: gradient accumulation, config validation, checkpoints (and
their validation on resume)."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moe_ext.training import TrainConfig, has_checkpoint, train
from moe_ext.utils.io import sha256_file

X = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
Y = torch.randn(8, 1, generator=torch.Generator().manual_seed(1))


def fit(grad_accum, ckpt=None, steps=5):
    torch.manual_seed(0)
    model = nn.Linear(5, 1)
    per = 8 // grad_accum

    def batch_fn(step, micro, rank, world):
        return X[micro * per:(micro + 1) * per], Y[micro * per:(micro + 1) * per]

    def loss_fn(m, raw, batch):
        loss = (m(batch[0]) - batch[1]).square().mean()
        return loss, {"loss": loss.item()}

    result = train(model, batch_fn, loss_fn, TrainConfig(steps=steps, grad_accum=grad_accum,
                                                         lr=0.1, progress=False,
                                                         checkpoint_dir=ckpt))
    return model, result


def test_grad_accumulation_equals_the_full_batch():
    full, _ = fit(1)
    accum, result = fit(4)
    torch.testing.assert_close(accum.weight, full.weight, atol=1e-6, rtol=1e-6)
    assert len(result.history) == 5 and "grad_norm" in result.history[0]


def test_checkpoint_written_atomically_and_resumed(tmp_path):
    fit(2, str(tmp_path), steps=3)
    assert has_checkpoint(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["ckpt-3.safetensors", "trainer_state.json"]
    _, result = fit(2, str(tmp_path), steps=5)
    assert result.resumed_from == 3 and [h["step"] for h in result.history] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("field,value", [("steps", 0), ("grad_accum", 0), ("lr", 0.0),
                                         ("amp", "fp8"), ("checkpoint_every", 0)])
def test_train_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.update(tensors="../ckpt-3.safetensors"), "field 'tensors'"),
    (lambda m: m.update(tensors="/etc/passwd"), "field 'tensors'"),
    (lambda m: m.update(step="3"), "field 'step'"),
    (lambda m: m.update(sha256="0" * 64), "does not match the SHA-256"),
    (lambda m: m.update(param_groups=None), "field 'param_groups'"),
], ids=["dotdot", "absolute", "step-string", "checksum", "param-groups"])
def test_bad_trainer_state_is_refused_naming_file_and_field(tmp_path, edit, match):
    fit(1, str(tmp_path), steps=3)
    path = tmp_path / "trainer_state.json"
    meta = json.loads(path.read_text())
    assert meta["sha256"] == sha256_file(str(tmp_path / "ckpt-3.safetensors"))
    edit(meta)
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=match) as err:
        fit(1, str(tmp_path), steps=5)
    assert "trainer_state.json" in str(err.value) or "ckpt-3" in str(err.value)


def test_nan_in_checkpoint_is_refused(tmp_path):
    fit(1, str(tmp_path), steps=3)
    path = str(tmp_path / "ckpt-3.safetensors")
    tensors = load_file(path)
    tensors["param.weight"][0, 0] = float("nan")
    save_file(tensors, path)
    meta = json.loads((tmp_path / "trainer_state.json").read_text())
    meta["sha256"] = sha256_file(path)
    (tmp_path / "trainer_state.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="param.weight holds NaN"):
        fit(1, str(tmp_path), steps=5)
