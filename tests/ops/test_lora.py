"""The sparse grouped LoRA ops (lora_forward / lora_backward) and both strategies of
functional.molora, against reference.molora in float64, on every device (the CUDA
parametrisation runs where there is a GPU)."""
import resource

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from moe_ext import functional, ops, reference
from conftest import make_inputs

STRATEGIES = ["sparse", "dense"]

# (T, D, O, E, R, N, K, logit_scale): every code path of the CPU and CUDA kernels
SHAPES = [
    (1, 8, 8, 4, 4, 0, 2, 1.0),          # T = 1
    (37, 19, 23, 4, 5, 0, 2, 1.0),       # odd T, D, O and R (remainder loops)
    (70, 33, 65, 3, 1, 0, 1, 1.0),       # R = 1, K = 1, T over two token blocks
    (70, 33, 130, 3, 1, 0, 1, 1.0),      # O past one CUDA column block (128)
    (45, 16, 16, 4, 8, 2, 6, 1.0),       # K = E + N (dense soft routing) with null experts
    (64, 40, 24, 6, 16, 2, 3, 1.0),      # null experts chosen among top-K
    (200, 72, 140, 6, 40, 2, 3, 1.0),    # R > 16 (several rank chunks)
    (300, 300, 270, 8, 16, 0, 2, 1.0),   # many tokens, columns past one block and one tile
    (50, 12, 10, 64, 4, 0, 2, 1.0),      # E > T*K: most experts never chosen
]


def all_on_one_expert(device, T=40, D=20, O=18, E=5, R=3):
    x, L, A, B = make_inputs(T, D, O, E, R, dtype=torch.float64, device=device)
    L = torch.zeros_like(L)
    L[:, 2] = 30.0  # every token picks expert 2 first
    return x, L, A, B


def run(x, L, A, B, K, N, strategy, **kw):
    return functional.molora(x, L, A, B, K, 0.8, N, strategy=strategy, **kw)


def fwd_bwd(x, L, A, B, K, N, strategy, gy=None):
    y = run(x, L, A, B, K, N, strategy)
    gy = torch.ones_like(y) if gy is None else gy
    return [y] + list(torch.autograd.grad(y, (x, L, A, B), gy))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T%d_D%d_O%d_E%d_R%d_N%d_K%d" % s[:7])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_forward_backward_match_reference_float64(device, shape, strategy):
    T, D, O, E, R, N, K, scale = shape
    x, L, A, B = make_inputs(T, D, O, E, R, N, torch.float64, device, grad=True, logit_scale=scale)
    y = run(x, L, A, B, K, N, strategy)
    y_ref = reference.molora(x, L, A, B, K, 0.8, N)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-10)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, L, A, B), gy)
    want = torch.autograd.grad(y_ref, (x, L, A, B), gy)
    for name, g, w in zip(("x", "router_logits", "lora_A", "lora_B"), got, want):
        torch.testing.assert_close(g, w, atol=1e-11, rtol=1e-9, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("T", [40, 1100])  # 1100 pairs: CUDA's weight_grad over 3 chunks of 512
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_all_tokens_on_one_expert(device, strategy, T):
    x, L, A, B = all_on_one_expert(device, T=T)
    for t in (x, L, A, B):
        t.requires_grad_(True)
    y = run(x, L, A, B, 2, 0, strategy)
    y_ref = reference.molora(x, L, A, B, 2, 0.8)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-10)
    got = torch.autograd.grad(y.sum(), (x, L, A, B))
    want = torch.autograd.grad(y_ref.sum(), (x, L, A, B))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-11, rtol=1e-9)


def test_never_chosen_experts_get_zero_gradient(device):
    x, L, A, B = make_inputs(30, 10, 12, 6, 4, dtype=torch.float64, device=device, grad=True)
    with torch.no_grad():
        L[:, 4:] = -50.0  # experts 4 and 5 are never chosen
    y = functional.molora(x, L, A, B, 2, 1.0)
    dA, dB = torch.autograd.grad(y.square().sum(), (A, B))
    assert dA[4:].abs().max() == 0 and dB[4:].abs().max() == 0
    assert dA[:4].abs().max() > 0 and dB[:4].abs().max() > 0


def test_only_null_experts_gives_zero_delta(device):
    x, L, A, B = make_inputs(10, 6, 7, 2, 3, N=2, dtype=torch.float64, device=device, grad=True)
    with torch.no_grad():
        L[:, :2] = -50.0
    y = functional.molora(x, L, A, B, 2, 1.0, num_null_experts=2)
    assert y.abs().max() == 0
    dx, = torch.autograd.grad(y.sum(), (x,))
    assert dx.abs().max() == 0


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("N,K,normalize", [(0, 2, True), (2, 2, True), (1, 3, False)])
def test_gradcheck_float64(strategy, N, K, normalize):
    x, L, A, B = make_inputs(9, 5, 6, 3, 2, N, torch.float64, grad=True)
    bias = torch.randn(3 + N, dtype=torch.float64, requires_grad=True)

    def f(x, L, A, B, bias):
        return functional.molora(x, L, A, B, K, 1.5, N, normalize, temperature=0.8,
                                 logit_bias=bias, strategy=strategy)

    assert torch.autograd.gradcheck(f, (x, L, A, B, bias))


def lowp_error(dtype, strategy, device, T=200, D=96, O=80):
    """(our error, PyTorch's own error in dtype), both against float64."""
    x, L, A, B = make_inputs(T, D, O, 8, 16, 0, torch.float64, device, grad=True)
    gy = torch.randn(T, O, dtype=torch.float64, device=device)
    y64 = reference.molora(x, L, A, B, 2, 2.0)
    g64 = torch.autograd.grad(y64, (x, A, B), gy)
    low = [t.detach().to(dtype).requires_grad_(True) for t in (x, L, A, B)]
    y = functional.molora(*low, 2, 2.0, strategy=strategy)
    g = torch.autograd.grad(y, (low[0], low[2], low[3]), gy.to(dtype))
    # PyTorch's own: the same math with every tensor op run in `dtype` (a loop over experts)
    tl = [t.detach().to(dtype).requires_grad_(True) for t in (x, A, B)]
    _, w, e, _ = reference.route(L.detach(), 2)
    yt = torch.zeros(T, O, dtype=dtype, device=device)
    for i in range(8):
        gate = (w * (e == i)).sum(1).to(dtype)
        yt = yt + 2.0 * gate[:, None] * ((tl[0] @ tl[1][i].T) @ tl[2][i].T)
    gt = torch.autograd.grad(yt, tl, gy.to(dtype))
    ours = [(y.double() - y64).abs().max()] + [(a.double() - b).abs().max() for a, b in zip(g, g64)]
    torch_own = [(yt.double() - y64).abs().max()] + [(a.double() - b).abs().max()
                                                      for a, b in zip(gt, g64)]
    return ours, torch_own


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_low_precision_error_at_most_twice_pytorch(device, dtype, strategy):
    sizes = dict(T=512, D=256, O=192) if device.type == "cuda" else {}
    ours, torch_own = lowp_error(dtype, strategy, device, **sizes)
    for name, a, b in zip(("y", "dx", "dA", "dB"), ours, torch_own):
        assert a <= 2 * b + 1e-6, f"{name}: our error {a:.3g} vs PyTorch's {b:.3g} in {dtype}"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bitwise_repeatable(device, strategy):
    x, L, A, B = make_inputs(3000, 256, 192, 16, 16, 1, torch.bfloat16, device, grad=True)
    first = fwd_bwd(x, L, A, B, 2, 1, strategy)
    for _ in range(2):
        for a, b in zip(first, fwd_bwd(x, L, A, B, 2, 1, strategy)):
            assert torch.equal(a, b)


def test_results_independent_of_thread_count_bitwise():
    x, L, A, B = make_inputs(500, 64, 48, 8, 8, 1, torch.float32, grad=True)

    def once():
        y = functional.molora(x, L, A, B, 2, 1.0, 1, strategy="sparse")
        return [y] + list(torch.autograd.grad(y.square().sum(), (x, L, A, B)))

    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = once()
    finally:
        torch.set_num_threads(n)
    again, many = once(), once()
    for a, b, c in zip(one, again, many):
        assert torch.equal(b, c)  # repeatable
        assert torch.equal(a, b)  # and the same for any thread count


def test_opcheck_lora_ops(device):
    x, L, A, B = make_inputs(13, 7, 9, 3, 2, 1, torch.float32, device, grad=True)
    r = ops.route(L.detach(), 2)
    w = r.weights.clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.moe_ext.lora_forward.default, (x, A, B, w, r.experts, 0.5, 1))
    y, h, order, offsets = torch.ops.moe_ext.lora_forward(x.detach(), A.detach(), B.detach(),
                                                          r.weights, r.experts, 0.5, 1)
    torch.library.opcheck(torch.ops.moe_ext.lora_backward.default,
                          (torch.randn_like(y), x.detach(), A.detach(), B.detach(), r.weights,
                           r.experts, order, offsets, h, 0.5, 1))


@pytest.mark.parametrize("N,K", [(0, 2), (2, 3), (1, 5)])
def test_lora_forward_returns_the_pair_alignment(device, N, K):
    """order and offsets are lora_backward's alignment (every null expert in bin E)."""
    x, L, A, B = make_inputs(90, 8, 6, 4, 3, N, torch.float32, device)
    r = ops.route(L, K)
    _, _, order, offsets = torch.ops.moe_ext.lora_forward(x, A, B, r.weights, r.experts, 0.5, N)
    want_order, want_offsets = ops.pair_alignment(r.experts, 4)
    assert torch.equal(order, want_order) and torch.equal(offsets, want_offsets)
    assert offsets.shape == (4 + 2,)


def test_backward_reuses_the_forwards_alignment(device):
    """The autograd saves order / offsets from lora_forward: no align in the backward."""
    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    x, L, A, B = make_inputs(30, 8, 6, 4, 3, 1, torch.float32, device, grad=True)
    y = run(x, L, A, B, 2, 1, "sparse")
    with Calls() as calls:
        y.sum().backward()
    assert "moe_ext.lora_backward" in calls.names
    assert "moe_ext.align" not in calls.names, calls.names


def test_ops_reject_bad_ids_and_shapes():
    x, L, A, B = make_inputs(6, 5, 4, 3, 2)
    r = ops.route(L, 2)
    bad = r.experts.clone()
    bad[0, 0] = 3  # no null experts: id 3 is out of range
    with pytest.raises(ValueError, match="experts"):
        ops.lora_sparse(x, A, B, r.weights, bad, 1.0)
    with pytest.raises(ValueError, match="weights"):
        ops.lora_sparse(x, A, B, r.weights[:3], r.experts[:3], 1.0)
    with pytest.raises(RuntimeError, match="weights must be"):
        ops.lora_sparse(x, A, B, r.weights.double(), r.experts, 1.0)


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 70), D=st.integers(1, 40), O=st.integers(1, 40), E=st.integers(1, 9),
       R=st.integers(1, 9), N=st.integers(0, 2), data=st.data())
def test_random_shapes(T, D, O, E, R, N, data):
    K = data.draw(st.integers(1, E + N))
    strategy = data.draw(st.sampled_from(STRATEGIES))
    x, L, A, B = make_inputs(T, D, O, E, R, N, torch.float64, grad=True,
                             seed=data.draw(st.integers(0, 10**6)))
    y = functional.molora(x, L, A, B, K, 0.5, N, strategy=strategy)
    y_ref = reference.molora(x, L, A, B, K, 0.5, N)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-10)
    got = torch.autograd.grad(y.sum(), (x, L, A, B))
    want = torch.autograd.grad(y_ref.sum(), (x, L, A, B))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-11, rtol=1e-9)


def backward_args(T=20, D=6, O=5, E=3, R=2, N=1, K=2, seed=0):
    """A valid lora_backward call: (grad_y, x, A, B, weights, experts, order, offsets, h, s, N)."""
    x, L, A, B = make_inputs(T, D, O, E, R, N, torch.float64, seed=seed)
    r = ops.route(L, K)
    y, h, order, offsets = torch.ops.moe_ext.lora_forward(x, A, B, r.weights, r.experts, 0.7, N)
    return [torch.randn_like(y), x, A, B, r.weights, r.experts, order, offsets, h, 0.7, N]


def _swap_across_bins(args):
    order, offsets = args[6].clone(), args[7]
    i, j = int(offsets[0]), int(offsets[-2])  # first pair of bin 0 and first of the null bin
    order[i], order[j] = order[j].clone(), order[i].clone()
    return order


@pytest.mark.parametrize("mutate,name", [
    (lambda a: {7: a[7] + 1}, "offsets"),                                   # does not start at 0
    (lambda a: {7: torch.cat([a[7][:2].flip(0), a[7][2:]])}, "offsets"),    # decreases
    (lambda a: {7: a[7].clamp(max=int(a[7][-1]) - 1)}, "offsets"),          # ends before P
    (lambda a: {7: torch.full_like(a[7], 2**62)}, "offsets"),
    (lambda a: {7: a[7][:-1]}, "offsets"),                                  # (E + N + 1,) no more
    (lambda a: {6: a[6].index_fill(0, torch.tensor([3]), 40)}, "order"),    # past P
    (lambda a: {6: a[6].index_fill(0, torch.tensor([3]), -2**63)}, "order"),
    (lambda a: {6: a[6].index_fill(0, torch.tensor([3]), int(a[6][4]))}, "order"),  # repeated
    (lambda a: {6: _swap_across_bins(a)}, "order"),                         # wrong bins
    (lambda a: {5: a[5].index_fill(1, torch.tensor([0]), -1)}, "experts"),
    (lambda a: {9: float("nan")}, "scaling"),
    (lambda a: {10: 2**63 - 1}, "num_null_experts"),
])
def test_lora_backward_rejects_bad_alignment_ids_and_scalars(mutate, name):
    """These read out of bounds (SIGSEGV, ASan heap overflows) or overflowed before."""
    args = backward_args()
    for i, v in mutate(args).items():
        args[i] = v
    with pytest.raises(ValueError, match=name):
        torch.ops.moe_ext.lora_backward(*args)


def test_lora_backward_takes_the_null_experts_in_one_bin():
    args = backward_args(N=3, K=3)
    want = torch.autograd.grad(reference.lora_delta(*[a.requires_grad_(a.is_floating_point())
                                                      for a in args[1:6]], 0.7), args[1:5], args[0])
    dx, dw, dA, dB = torch.ops.moe_ext.lora_backward(*args)
    for g, w in zip((dx, dA, dB, dw), want):
        torch.testing.assert_close(g, w)


def test_null_experts_cost_nothing():
    """num_null_experts = 2**30 used to make the backward align 2**30 bins (~16 GB)."""
    x, L, A, B = make_inputs(30, 8, 6, 3, 2, 1, torch.float64, grad=True)
    r = ops.route(L, 2)
    huge = r.experts.masked_fill(r.experts == 3, 3 + 2**30 - 1)  # the last of 2**30 null experts
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outs = []
    for experts, N in ((r.experts, 1), (huge, 2**30)):
        y = ops.lora_sparse(x, A, B, r.weights.detach(), experts, 0.5, N)
        outs.append([y] + list(torch.autograd.grad(y.square().sum(), (x, A, B))))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_scaling_and_num_null_experts_checked_before_use():
    x, L, A, B = make_inputs(6, 5, 4, 3, 2)
    r = ops.route(L, 2)
    for s, N, name in [(float("inf"), 0, "scaling"), (float("nan"), 0, "scaling"),
                       (1.0, -1, "num_null_experts"), (1.0, 2**63 - 1, "num_null_experts"),
                       (1.0, 2**31 - 3, "num_null_experts")]:  # E + N = 2**31: past int32 ids
        with pytest.raises(ValueError, match=name):
            ops.lora_sparse(x, A, B, r.weights, r.experts, s, N)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scaling_past_float32_is_an_error_below_float64(dtype):
    """1e39 is finite in float64 but inf in float32, the kernels' accumulation dtype: it
    would turn all-zero inputs into NaN (inf * 0), so it is refused, naming scaling; float64
    inputs accumulate in float64 and take it."""
    x, L, A, B = make_inputs(6, 5, 4, 3, 2)
    r = ops.route(L, 2)
    x, A, B = (t.zero_().to(dtype) for t in (x, A, B))
    w = r.weights.float()
    for call in (lambda: ops.lora_sparse(x, A, B, w, r.experts, 1e39),
                 lambda: ops.lora_dense(x, A, B, w, r.experts, 1e39),
                 lambda: torch.ops.moe_ext.lora_dense_expand(
                     torch.zeros(6, B.shape[0] * B.shape[2], dtype=dtype), B, w, r.experts, -1e39, 0)):
        with pytest.raises(ValueError, match="scaling must be a finite number in torch.float32|"
                                             "scaling must be a finite number in float32"):
            call()
    y = ops.lora_sparse(x.double(), A.double(), B.double(), r.weights.double(), r.experts, 1e39)
    assert torch.equal(y, torch.zeros_like(y))


def test_meta_tensor_among_real_ones_is_an_error():
    x, L, A, B = make_inputs(6, 5, 4, 3, 2)
    r = ops.route(L, 2)
    with pytest.raises(RuntimeError, match="lora_A is on meta"):
        ops.lora_sparse(x, A.to("meta"), B, r.weights, r.experts, 1.0)
    args = backward_args()
    args[7] = args[7].to("meta")
    with pytest.raises(RuntimeError, match="offsets is on meta"):
        torch.ops.moe_ext.lora_backward(*args)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_second_derivatives_match_reference(strategy):
    """create_graph=True used to give silently wrong (zero) second derivatives."""
    x, L, A, B = make_inputs(7, 5, 6, 3, 2, 1, torch.float64, grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def f(x, L, A, B, bias):
        return functional.molora(x, L, A, B, 2, 1.3, 1, temperature=0.7, logit_bias=bias,
                                 strategy=strategy)

    assert torch.autograd.gradgradcheck(f, (x, L, A, B, bias))
    inputs = (x, L, A, B, bias)
    got = torch.autograd.grad(f(*inputs).square().sum(), inputs, create_graph=True)
    want = torch.autograd.grad(reference.molora(x, L, A, B, 2, 1.3, 1, True, 0.7, bias).square().sum(),
                               inputs, create_graph=True)
    second = torch.autograd.grad(sum((g * g).sum() for g in got), inputs)
    second_ref = torch.autograd.grad(sum((g * g).sum() for g in want), inputs)
    for a, b in zip(second, second_ref):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_lora_backward_op_has_no_derivative():
    args = backward_args()
    args[0].requires_grad_(True)
    with pytest.raises(RuntimeError, match="has no derivative"):
        torch.ops.moe_ext.lora_backward(*args)[0].sum().backward()


@pytest.mark.parametrize("op", ["lora", "lora_dense"])
def test_saved_activation_is_not_differentiable_and_fake_grads_are_contiguous(device, op):
    """h (h_all) is an output only for the backward: it carries no gradient. The backward's
    fake kernel gives contiguous gradients for a non-contiguous x, as the kernels do."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    x, L, A, B = make_inputs(12, 8, 6, 3, 4, 0, torch.float32, device, grad=True)
    r = ops.route(L.detach(), 2)
    forward = getattr(torch.ops.moe_ext, f"{op}_forward")
    outs = forward(x, A, B, r.weights, r.experts, 0.5, 0)
    assert outs[0].requires_grad and not outs[1].requires_grad
    saved = (outs[2], outs[3], outs[1]) if op == "lora" else outs[1:2]  # order, offsets, h
    x_t = x.detach().t().contiguous().t()  # (T, D) with transposed strides
    args = (outs[0].detach(), x_t, A.detach(), B.detach(), r.weights, r.experts, *saved, 0.5, 0)
    backward = getattr(torch.ops.moe_ext, f"{op}_backward")
    assert all(g.is_contiguous() for g in backward(*args))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fakes = backward(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    assert all(g.is_contiguous() for g in fakes)
