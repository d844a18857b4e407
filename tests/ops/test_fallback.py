"""The PyTorch fallbacks registered for CUDA match the C++ kernels (checked on the CPU, by
calling them directly: the code is device-agnostic)."""
import pytest
import torch

from moe_ext import ops, reference
from moe_ext.ops import fallback
from conftest import make_inputs

C = torch.ops.moe_ext


@pytest.mark.parametrize("K,N,normalize", [(2, 0, True), (3, 2, True), (1, 1, False), (6, 2, True)])
def test_route_and_backward_match_kernels(K, N, normalize):
    x, L, A, B = make_inputs(37, 9, 7, 4, 3, N, torch.float64)
    bias = torch.randn(4 + N, dtype=torch.float64)
    want = C.route(L, bias, K, 0.7, normalize)
    got = fallback.route(L, bias, K, 0.7, normalize)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12)
    gp, gw = torch.randn_like(want[0]), torch.randn_like(want[1])
    torch.testing.assert_close(fallback.route_backward(gp, gw, *want[:3], 0.7, normalize),
                               C.route_backward(gp, gw, *want[:3], 0.7, normalize))
    torch.testing.assert_close(fallback.route_backward(None, gw, *want[:3], 0.7, normalize),
                               C.route_backward(None, gw, *want[:3], 0.7, normalize))


def test_align_matches_kernel():
    experts = torch.randint(0, 9, (300, 2))
    for g, w in zip(fallback.OPS["align"](experts, 9), C.align(experts, 9)):
        assert torch.equal(g, w)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("K,N", [(2, 0), (3, 2), (5, 1)])
def test_lora_ops_match_kernels(dtype, K, N):
    x, L, A, B = make_inputs(41, 13, 11, 4, 3, N, dtype)
    r = ops.route(L, K)
    w = r.weights.to(ops.acc_dtype(dtype))
    tol = dict(atol=1e-10, rtol=1e-9) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-4)
    y, h, order, offsets = C.lora_forward(x, A, B, w, r.experts, 0.9, N)
    fy, fh, forder, foffsets = fallback.lora_forward(x, A, B, w, r.experts, 0.9, N)
    assert torch.equal(forder, order) and torch.equal(foffsets, offsets)
    torch.testing.assert_close(fy, y, **tol)
    torch.testing.assert_close(fh, h, **tol)
    dy = torch.randn_like(y)
    want = C.lora_backward(dy, x, A, B, w, r.experts, order, offsets, h, 0.9, N)
    got = fallback.lora_backward(dy, x, A, B, w, r.experts, order, offsets, h, 0.9, N)
    for g, k in zip(got, want):
        torch.testing.assert_close(g, k, **tol)
    y, h_all = C.lora_dense_forward(x, A, B, w, r.experts, 0.9, N)
    for g, k in zip(fallback.OPS["lora_dense_forward"](x, A, B, w, r.experts, 0.9, N), (y, h_all)):
        torch.testing.assert_close(g, k, **tol)
    for g, k in zip(fallback.OPS["lora_dense_backward"](dy, x, A, B, w, r.experts, h_all, 0.9, N),
                    C.lora_dense_backward(dy, x, A, B, w, r.experts, h_all, 0.9, N)):
        torch.testing.assert_close(g, k, **tol)
    torch.testing.assert_close(fallback.OPS["lora_dense_expand"](h_all, B, w, r.experts, 0.9, N),
                               C.lora_dense_expand(h_all, B, w, r.experts, 0.9, N), **tol)
    for g, k in zip(fallback.OPS["lora_dense_expand_backward"](dy, h_all, B, w, r.experts, 0.9, N),
                    C.lora_dense_expand_backward(dy, h_all, B, w, r.experts, 0.9, N)):
        torch.testing.assert_close(g, k, **tol)


def test_fallbacks_registered_for_cuda_only_where_no_kernel():
    for name in fallback.REGISTERED:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"moe_ext::{name}", "CUDA")
    assert set(fallback.REGISTERED) <= set(fallback.OPS)


def test_fallbacks_check_arguments_and_keep_bad_ids_in_bounds(monkeypatch):
    """As the CUDA kernels: sizes always checked; without MOE_EXT_DEBUG bad ids act as the
    last bin / add nothing instead of an out-of-range scatter (a device assert on a GPU)."""
    monkeypatch.delenv("MOE_EXT_DEBUG", raising=False)
    experts = torch.tensor([[0, 7], [-3, 1]])
    order, offsets = fallback.OPS["align"](experts, 3)
    assert offsets.tolist() == [0, 1, 2, 4] and sorted(order.tolist()) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="num_bins"):
        fallback.OPS["align"](experts, 2**40)
    monkeypatch.setenv("MOE_EXT_DEBUG", "1")
    with pytest.raises(ValueError, match="experts"):
        fallback.OPS["align"](experts, 3)
    r = ops.route(torch.randn(2, 3, dtype=torch.float64), 2)
    gw = torch.ones(2, 2, dtype=torch.float64)
    valid = fallback.OPS["route_backward"](None, gw, r.probs, r.weights, r.experts, 1.0, True)
    bad = r.experts.clone()
    bad[0, 1] = 2**40
    g = fallback.OPS["route_backward"](None, gw, r.probs, r.weights, bad, 1.0, True)
    assert torch.isfinite(g).all() and torch.equal(g[1], valid[1])
    with pytest.raises(ValueError, match="scaling"):
        fallback.OPS["lora_dense_forward"](torch.zeros(2, 4, dtype=torch.float64),
                                           torch.zeros(3, 2, 4, dtype=torch.float64),
                                           torch.zeros(3, 5, 2, dtype=torch.float64), r.weights,
                                           r.experts, float("nan"), 0)
