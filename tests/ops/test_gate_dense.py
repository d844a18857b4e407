"""The dense-gated strategy's mask ops (gate_dense / gate_dense_backward) against the
reference mask, on every device."""
import pytest
import torch

from moe_ext import ops, reference
from conftest import make_inputs

C = torch.ops.moe_ext


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_gate_ops_match_reference(device, dtype):
    g = torch.Generator().manual_seed(7)
    T, E, R, N, K = 90, 5, 6, 1, 3
    r = reference.route(torch.randn(T, E + N, generator=g, dtype=torch.float64), K)
    w, experts = r[1].to(ops.acc_dtype(dtype)).to(device), r[2].to(device)
    h_all = torch.randn(T, E * R, generator=g, dtype=torch.float64).requires_grad_(True)
    w64 = r[1].clone().requires_grad_(True)
    want = reference.gate_dense(h_all, w64, r[2], E, N, 0.9)
    grad = torch.randn(T, E * R, generator=g, dtype=torch.float64)
    want_dh, want_dw = torch.autograd.grad(want, (h_all, w64), grad)
    got = C.gate_dense(h_all.detach().to(device, dtype), w, experts, E, N, 0.9)
    got_dh, got_dw = C.gate_dense_backward(grad.to(device, dtype), h_all.detach().to(device, dtype),
                                           w, experts, E, N, 0.9)
    tol = {torch.float64: dict(atol=1e-12, rtol=1e-12), torch.float32: dict(atol=1e-5, rtol=1e-5)}
    tol = tol.get(dtype, dict(atol=3e-2, rtol=2e-2))
    for name, a, b in (("gated", got, want), ("grad_h_all", got_dh, want_dh), ("grad_w", got_dw, want_dw)):
        torch.testing.assert_close(a.cpu().double(), b.detach(), **tol, msg=lambda m: f"{name}: {m}")


def test_opcheck_gate_ops(device):
    x, L, A, B = make_inputs(13, 7, 9, 3, 2, 1, torch.float32, device)
    r = ops.route(L, 2)
    w = r.weights.clone().requires_grad_(True)
    h_all = torch.randn(13, 6, device=device, requires_grad=True)
    torch.library.opcheck(C.gate_dense.default, (h_all, w, r.experts, 3, 1, 0.5))
    torch.library.opcheck(C.gate_dense_backward.default,
                          (torch.randn_like(h_all), h_all.detach(), r.weights, r.experts, 3, 1, 0.5))


def test_gate_rejects_bad_ids():
    r = ops.route(torch.randn(6, 3), 2)
    bad = r.experts.clone()
    bad[0, 0] = 3  # no null experts: id 3 is out of range
    with pytest.raises(ValueError, match="experts"):
        ops.gate_dense(torch.randn(6, 6), r.weights, bad, 3, 0, 1.0)


@pytest.mark.parametrize("op", ["gate_dense", "gate_dense_backward"])
def test_gate_ops_reject_bad_scalars_before_any_arithmetic(op):
    r = ops.route(torch.randn(6, 4), 2)
    h_all = torch.randn(6, 6)
    args = lambda E, N, s: ((h_all, r.weights, r.experts, E, N, s) if op == "gate_dense" else
                            (torch.randn_like(h_all), h_all, r.weights, r.experts, E, N, s))
    for E, N, s, name in [(3, 1, float("nan"), "scaling"), (3, 1, float("inf"), "scaling"),
                          (3, -1, 1.0, "num_null_experts"), (3, 2**63 - 1, 1.0, "num_null_experts"),
                          (0, 1, 1.0, "num_experts"), (2**62, 1, 1.0, "num_experts")]:
        with pytest.raises(ValueError, match=name):
            getattr(C, op)(*args(E, N, s))


def test_gate_ops_with_no_tokens():
    """T = 0 (the reference and the CUDA fallback could not reshape it before)."""
    w, e = torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.long)
    for impl in (C.gate_dense, reference.gate_dense):
        assert impl(torch.zeros(0, 6), w, e, 3, 1, 1.0).shape == (0, 6)
    dh, dw = C.gate_dense_backward(torch.zeros(0, 6), torch.zeros(0, 6), w, e, 3, 1, 1.0)
    assert dh.shape == (0, 6) and dw.shape == (0, 2)
