"""Export output is clean: no torchvision registration lines, no warning per MoLoRA layer
about `last_routing`, and no routing state left on the layers by tracing."""
import logging
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from moe_ext import MoLoRAConfig, MoLoRALinear  # noqa: E402
from moe_ext.export import to_onnx  # noqa: E402


def test_export_prints_no_third_party_noise(tmp_path, capfd, caplog):
    layer = MoLoRALinear(nn.Linear(8, 6), MoLoRAConfig(r=2, num_experts=3, top_k=2)).eval()
    layer(torch.randn(4, 8))  # a used layer holds its last routing (torch.export warned per tensor)
    before = layer.last_routing
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        to_onnx(layer, str(tmp_path / "layer.onnx"), {"x": torch.randn(2, 3, 8)})
    err = capfd.readouterr().err
    assert "torchvision" not in err and not any("torchvision" in r.getMessage() for r in caplog.records)
    assert not [w for w in caught if "last_routing" in str(w.message) or "axis name" in str(w.message)]
    assert torch.equal(layer.last_routing.experts, before.experts)  # tracing left it alone
    layer(torch.randn(5, 8))  # outside the export the layer records its routing as before
    assert layer.last_routing.experts.shape == (5, 2)
