"""moe_ext::route and its backward against reference.route, on every device."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from moe_ext import ops, reference


@pytest.mark.parametrize("T,M,K", [(1, 1, 1), (7, 4, 2), (33, 8, 8), (64, 12, 3), (5, 40, 11)])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("temperature,use_bias", [(1.0, False), (0.5, True), (2.0, True)])
def test_route_matches_reference(device, T, M, K, normalize, temperature, use_bias):
    g = torch.Generator().manual_seed(T * M + K)
    logits = torch.randn(T, M, generator=g, dtype=torch.float64).to(device)
    bias = torch.randn(M, generator=g, dtype=torch.float64).to(device) if use_bias else None
    got = ops.route(logits, K, temperature, bias, normalize)
    want = reference.route(logits, K, temperature, bias, normalize)
    torch.testing.assert_close(got.probs, want[0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got.weights, want[1], atol=1e-12, rtol=1e-12)
    assert torch.equal(got.experts, want[2])
    assert torch.equal(got.counts, want[3])
    assert int(got.counts.sum()) == T * K


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_route_low_precision_logits_route_in_float32(device, dtype):
    logits = torch.randn(50, 6).to(dtype)
    got = ops.route(logits.to(device), 2)
    want = reference.route(logits.float().to(device), 2)
    assert got.probs.dtype == torch.float32
    torch.testing.assert_close(got.probs, want[0], atol=1e-6, rtol=1e-5)
    assert torch.equal(got.experts, want[2])


def test_route_ties_pick_lower_id(device):
    logits = torch.zeros(3, 5, device=device)
    r = ops.route(logits, 3)
    assert r.experts.tolist() == [[0, 1, 2]] * 3
    torch.testing.assert_close(r.weights.cpu(), torch.full((3, 3), 1 / 3))
    logits[:, 3] = 1.0
    assert ops.route(logits, 3).experts.tolist() == [[3, 0, 1]] * 3


def test_route_all_tokens_on_one_expert(device):
    logits = torch.randn(100, 6, device=device)
    bias = torch.tensor([0.0, 0, 0, 50, 0, 0], device=device)
    r = ops.route(logits, 1, logit_bias=bias)
    assert (r.experts == 3).all() and r.counts.tolist() == [0, 0, 0, 100, 0, 0]


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("use_bias", [False, True])
def test_route_gradcheck(normalize, use_bias):
    torch.manual_seed(0)
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True) if use_bias else None

    def f(logits, bias):
        r = ops.route(logits, 2, 0.7, bias, normalize)
        return r.probs, r.weights

    assert torch.autograd.gradcheck(f, (logits, bias))


@pytest.mark.parametrize("normalize", [True, False])
def test_route_gradients_match_reference(device, normalize):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(200, 24, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    gp = torch.randn(200, 24, generator=g, dtype=torch.float64).to(device)
    gw = torch.randn(200, 3, generator=g, dtype=torch.float64).to(device)
    r = ops.route(logits, 3, 1.3, None, normalize)
    got = torch.autograd.grad((r.probs * gp).sum() + (r.weights * gw).sum(), logits)[0]
    p, w, _, _ = reference.route(logits, 3, 1.3, None, normalize)
    want = torch.autograd.grad((p * gp).sum() + (w * gw).sum(), logits)[0]
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    # the backward op without grad_probs equals it with zeros
    args = (r.weights.detach(), r.experts, 1.3, normalize)
    C = torch.ops.moe_ext
    torch.testing.assert_close(C.route_backward(None, gw, r.probs.detach(), *args),
                               C.route_backward(torch.zeros_like(gp), gw, r.probs.detach(), *args))


def test_route_opcheck(device):
    logits = torch.randn(9, 6, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.moe_ext.route.default, (logits, None, 2, 1.0, True))
    torch.library.opcheck(torch.ops.moe_ext.route.default,
                          (logits.double(), torch.randn(6, dtype=torch.float64, device=device), 3,
                           0.5, False))
    r = ops.route(logits.detach(), 2)
    torch.library.opcheck(torch.ops.moe_ext.route_backward.default,
                          (torch.randn_like(r.probs), torch.randn_like(r.weights), r.probs,
                           r.weights, r.experts, 1.0, True))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_route_rejects_non_finite_logits(bad):
    logits = torch.randn(4, 3)
    logits[2, 1] = bad
    with pytest.raises(ValueError, match="router_logits"):
        ops.route(logits, 1)


@pytest.mark.parametrize("k", [0, 5])
def test_route_rejects_bad_top_k(k):
    with pytest.raises(ValueError, match="top_k"):
        ops.route(torch.randn(4, 4), k)


def test_route_rejects_bad_arguments():
    with pytest.raises(ValueError, match="router_logits"):
        ops.route(torch.randn(4), 1)
    with pytest.raises(ValueError, match="logit_bias"):
        ops.route(torch.randn(4, 3), 1, logit_bias=torch.zeros(4))
    with pytest.raises(ValueError, match="logit_bias"):
        ops.route(torch.randn(4, 3), 1, logit_bias=torch.tensor([0.0, float("nan"), 0.0]))
    with pytest.raises(ValueError, match="temperature"):
        ops.route(torch.randn(4, 3), 1, temperature=0.0)
    with pytest.raises(RuntimeError, match="router_logits"):
        ops.route(torch.randint(0, 3, (4, 3)), 1)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 40), M=st.integers(1, 20), data=st.data())
def test_route_random_shapes(T, M, data):
    K = data.draw(st.integers(1, M))
    seed = data.draw(st.integers(0, 2**31 - 1))
    logits = torch.randn(T, M, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = ops.route(logits, K)
    want = reference.route(logits, K)
    assert torch.equal(got.experts, want[2])
    torch.testing.assert_close(got.weights, want[1], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_route_finite_extremes_never_give_nan(device, dtype):
    """Finite logits, bias and temperature at the ends of the dtype's range route without
    NaN: (L + b) / tau overflowed to inf - inf before."""
    big = torch.finfo(dtype).max
    logits = torch.tensor([[big, big, -big, 0.0], [big, 1.0, 2.0, -big], [0.0, 1.0, 2.0, 3.0]],
                          dtype=dtype, device=device)
    bias = torch.tensor([big, -big, big, 0.0], dtype=dtype, device=device)
    tiny_tau = 1.0 / big * 2  # the smallest temperatures whose inverse is finite
    for b, tau in ((None, 1.0), (bias, 1.0), (None, tiny_tau), (bias, 1e-3), (None, 1e300)):
        r = ops.route(logits, 2, tau, b)
        for t in (r.probs, r.weights):
            assert torch.isfinite(t).all(), (b, tau)
        torch.testing.assert_close(r.probs.sum(-1).cpu(), torch.ones(3, dtype=dtype))
        want = reference.route(logits.cpu().double(), 2, tau, None if b is None else b.cpu().double())
        torch.testing.assert_close(r.probs.cpu().double(), want[0], atol=1e-6, rtol=1e-6)
    # with the bias: expert 0 takes all of rows 0 and 1, the others tie at 0 (lower id
    # first); in row 2, big + 0 and big + 2 are equal in the dtype: half each
    r = ops.route(logits, 2, 1.0, bias)
    assert r.experts.tolist() == [[0, 1], [0, 1], [0, 2]]
    assert r.weights[2].tolist() == [0.5, 0.5]


def test_route_temperature_needs_a_finite_inverse_in_the_routing_dtype():
    with pytest.raises(ValueError, match="temperature"):
        ops.route(torch.randn(4, 3), 1, temperature=1e-45)  # 1 / tau overflows float32
    r = ops.route(torch.randn(4, 3, dtype=torch.float64), 1, temperature=1e-300)
    assert torch.isfinite(r.probs).all()
    r = ops.route(torch.randn(4, 3), 2)
    with pytest.raises(ValueError, match="temperature"):
        torch.ops.moe_ext.route_backward(None, r.weights, r.probs, r.weights, r.experts, 1e-45, True)


def test_route_meta_tensor_among_real_ones_is_an_error():
    """A meta tensor dispatches to the fake kernel, which used to return uninitialised ids."""
    with pytest.raises(RuntimeError, match="logit_bias is on meta"):
        ops.route(torch.randn(4, 3), 1, logit_bias=torch.zeros(3, device="meta"))
    r = ops.route(torch.randn(4, 3), 2)
    with pytest.raises(RuntimeError, match="experts is on meta"):
        torch.ops.moe_ext.route_backward(None, r.weights, r.probs, r.weights,
                                         r.experts.to("meta"), 1.0, True)
    meta = ops.route(torch.randn(4, 3, device="meta"), 2)
    assert meta.experts.device.type == "meta" and meta.experts.shape == (4, 2)


@pytest.mark.parametrize("normalize", [True, False])
def test_route_second_derivatives(normalize):
    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def f(logits, bias):
        r = ops.route(logits, 2, 0.8, bias, normalize)
        return r.probs, r.weights

    assert torch.autograd.gradgradcheck(f, (logits, bias))


def test_route_backward_op_has_no_derivative():
    r = ops.route(torch.randn(4, 3, dtype=torch.float64), 2)
    gw = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    g = torch.ops.moe_ext.route_backward(None, gw, r.probs, r.weights, r.experts, 1.0, True)
    with pytest.raises(RuntimeError, match="has no derivative"):
        g.sum().backward()
