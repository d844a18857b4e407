"""MoLoRALinear over a torchao int8 weight-only quantised nn.Linear (a tensor-subclass
weight that reports a float dtype): trains, equals base + experts, and counts as quantised
for the export's float-base check."""
import pytest
import torch
from torch import nn

torchao = pytest.importorskip("torchao")
from torchao.quantization import Int8WeightOnlyConfig, quantize_  # noqa: E402

from moe_ext import MoLoRAConfig, MoLoRALinear  # noqa: E402
from moe_ext.molora import quantization_of, require_float_base  # noqa: E402
from moe_ext.molora.functional import molora  # noqa: E402


def test_int8_weight_only_base():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 48))
    quantize_(base, Int8WeightOnlyConfig())
    base = base[0].requires_grad_(False)
    assert quantization_of(base).startswith("torchao ")
    layer = MoLoRALinear(base, MoLoRAConfig(r=4, num_experts=3, top_k=2, strategy="dense"))
    assert layer.lora_A.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 64, requires_grad=True)
    y = layer(x)
    want = base(x) + molora(x, layer.router(x), layer.lora_A, layer.lora_B, 2,
                            layer.config.scaling, strategy="dense")
    torch.testing.assert_close(y, want)
    y.square().sum().backward()
    assert x.grad is not None and layer.lora_A.grad.abs().sum() > 0
    assert layer.router.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="torchao"):
        require_float_base(nn.Sequential(layer), "the ONNX export")
