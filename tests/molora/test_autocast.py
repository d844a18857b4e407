"""Mixed precision: every moe_ext op under torch.autocast runs on its inputs as given (the
ops' Autocast kernels, moe_ext/ops/autocast.py), and MoLoRALinear trains under autocast on
every path: strategy (sparse, dense, dense from the fused shrink) x autocast dtype x a plain
or a hooked router, forward and backward."""
import pytest
import torch
from torch import nn

from conftest import make_inputs
from moe_ext import MoLoRAConfig, MoLoRALinear, functional
from moe_ext.molora.functional import molora_from_shrink

DTYPES = [torch.bfloat16, torch.float16]


def _autocast_ok(device, dtype):
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")


def test_every_op_has_autocast_kernels():
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("moe_ext::")]
    assert len(names) >= 9
    for name in names:
        for key in ("AutocastCPU", "AutocastCUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(name, key), (name, key)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strategy", ["sparse", "dense"])
def test_functional_under_autocast_sees_its_inputs_as_given(device, strategy, dtype):
    """fp32 inputs under autocast: the kernels run in fp32, so the result and gradients
    equal those without autocast bit for bit (before the Autocast kernels the dense
    strategy's inner GEMM came back in half precision and the kernel raised
    "lora_dense_expand_cpu" not implemented for 'BFloat16')."""
    _autocast_ok(device, dtype)
    results = []
    for enabled in (False, True):
        x, L, A, B = make_inputs(24, 16, 12, 4, 3, N=1, device=device, grad=True)
        with torch.autocast(device.type, dtype=dtype, enabled=enabled):
            y = functional.molora(x, L, A, B, 2, 0.5, 1, strategy=strategy)
        (y * torch.arange(12, device=device)).sum().backward()
        results.append([y.detach(), x.grad, L.grad, A.grad, B.grad])
    assert results[1][0].dtype == torch.float32
    for want, got in zip(*results):
        assert torch.equal(want, got)


@pytest.mark.parametrize("dtype", DTYPES)
def test_expand_and_route_under_autocast(device, dtype):
    _autocast_ok(device, dtype)
    x, L, A, B = make_inputs(10, 8, 6, 3, 2, device=device)
    h_all = (x @ A.reshape(6, 8).T).requires_grad_()
    outs = []
    for enabled in (False, True):
        with torch.autocast(device.type, dtype=dtype, enabled=enabled):
            outs.append(molora_from_shrink(h_all, L, B, 2, 0.5).delta)
    assert torch.equal(outs[0], outs[1])


def _layer(strategy, hooked, device, dropout=0.0):
    torch.manual_seed(0)
    cfg = MoLoRAConfig(r=4, lora_alpha=8, num_experts=4, num_null_experts=1, top_k=2,
                       strategy=strategy, lora_dropout=dropout)
    layer = MoLoRALinear(nn.Linear(32, 24), cfg).to(device)
    layer.base.requires_grad_(False)  # frozen, as inject_molora leaves it
    with torch.no_grad():
        layer.lora_B.normal_(std=0.5)
        layer.router.weight.normal_(std=0.5)  # clear routing margins: bf16 flips no choice
    if hooked:  # e.g. accelerate's or DeepSpeed ZeRO-3's hooks: the router runs as a module
        layer.router.register_forward_hook(lambda module, args, output: None)
    return layer


def _run(layer, x, dtype):
    layer.zero_grad()
    x = x.clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        y = layer(x)
        aux = layer.last_routing.probs.square().sum()  # a router loss through the probs
    ((y.float() * torch.linspace(-1, 1, y.shape[-1], device=x.device)).sum() + aux).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, grads, layer.last_routing.experts.clone()


@pytest.mark.parametrize("hooked", [False, True], ids=["plain-router", "hooked-router"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("strategy", ["sparse", "dense"])
def test_layer_trains_under_autocast(device, strategy, dtype, hooked):
    """Plain router + dense is the fused path (dense from the shrink, lora_dense_expand);
    hooked + dense is lora_dense_forward; sparse is lora_forward either way. Each matches
    the fp32 layer to the autocast dtype's precision, with every gradient."""
    _autocast_ok(device, dtype)
    layer = _layer(strategy, hooked, device)
    x = torch.randn(3, 7, 32, device=device)
    assert layer._router_is_plain(x) is not hooked
    want_y, want_dx, want_grads, want_experts = _run(layer, x, None)
    y, dx, grads, experts = _run(layer, x, dtype)
    assert torch.equal(experts, want_experts)
    tol = dict(rtol=3e-2, atol=3e-2) if dtype == torch.bfloat16 else dict(rtol=5e-3, atol=5e-3)
    torch.testing.assert_close(y.float(), want_y, **tol)
    torch.testing.assert_close(dx.float(), want_dx, **tol)
    assert set(grads) == {"lora_A", "lora_B", "router.weight"}
    for name, g in grads.items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), name
        scale = want_grads[name].abs().max()
        assert (g - want_grads[name]).abs().max() <= tol["rtol"] * 4 * scale, name


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_layer_with_active_dropout_under_autocast(dtype):
    """Dropout unfuses the dense router (lora_dense_forward on dropout(x))."""
    layer = _layer("dense", False, torch.device("cpu"), dropout=0.1).train()
    y, dx, grads, _ = _run(layer, torch.randn(20, 32), dtype)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())


def test_compile_fullgraph_under_autocast():
    x, L, A, B = make_inputs(16, 8, 6, 4, 2)

    def f(x, L, A, B):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return functional.molora(x, L, A, B, 2, 0.5, strategy="dense")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, L, A, B), f(x, L, A, B))
