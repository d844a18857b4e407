"""The CUDA kernels: parity with the CPU kernels and the float64 reference per dtype,
CUDA-graph capture of forward + backward, bitwise repeatability, large E and large T,
debug-mode input checks. Skipped where there is no GPU (the CPU suite covers the same
contracts for the CPU kernels)."""
import pytest
import torch

from moe_ext import functional, ops, reference
from conftest import cuda_kernels_present, make_inputs

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and cuda_kernels_present()),
    reason="needs a CUDA device and an extension built with the CUDA kernels")

CUDA = torch.device("cuda")
LOW = [torch.float32, torch.bfloat16, torch.float16]
STRATEGIES = ["sparse", "dense"]
# (T, D, O, E, R, N, K): remainders of every tile (64 pairs, 32/128 columns, 16 ranks),
# R > 16, K = E + N, experts never chosen, null experts.
SHAPES = [(1, 8, 8, 4, 4, 0, 2), (37, 19, 23, 4, 5, 0, 2), (70, 33, 130, 3, 1, 0, 1),
          (45, 16, 16, 4, 8, 2, 6), (200, 72, 140, 6, 40, 2, 3), (300, 300, 270, 8, 16, 0, 2),
          (50, 12, 10, 64, 4, 0, 2)]


def fwd_bwd(x, L, A, B, K, N, strategy, gy=None):
    y = functional.molora(x, L, A, B, K, 0.8, N, strategy=strategy)
    gy = torch.ones_like(y) if gy is None else gy
    return [y] + list(torch.autograd.grad(y, (x, L, A, B), gy))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T%d_D%d_O%d_E%d_R%d_N%d_K%d" % s)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_float64_matches_reference(shape, strategy):
    T, D, O, E, R, N, K = shape
    x, L, A, B = make_inputs(T, D, O, E, R, N, torch.float64, CUDA, grad=True)
    gy = torch.randn(T, O, dtype=torch.float64, device=CUDA)
    got = fwd_bwd(x, L, A, B, K, N, strategy, gy)
    y_ref = reference.molora(x, L, A, B, K, 0.8, N)
    want = [y_ref] + list(torch.autograd.grad(y_ref, (x, L, A, B), gy))
    for name, g, w in zip(("y", "dx", "dlogits", "dA", "dB"), got, want):
        torch.testing.assert_close(g, w, atol=1e-11, rtol=1e-9, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_low_precision_error_at_most_twice_pytorch(dtype, strategy):
    """Against float64, our error per output is at most ~2x that of the same math done
    with PyTorch ops in `dtype` (a loop over experts, as MixLoRA does)."""
    T, D, O, E, R, K, s = 512, 256, 192, 8, 16, 2, 2.0
    x, L, A, B = make_inputs(T, D, O, E, R, 0, torch.float64, CUDA, grad=True)
    gy = torch.randn(T, O, dtype=torch.float64, device=CUDA)
    y64 = reference.molora(x, L, A, B, K, s)
    g64 = torch.autograd.grad(y64, (x, A, B), gy)
    low = [t.detach().to(dtype).requires_grad_(True) for t in (x, L, A, B)]
    y = functional.molora(*low, K, s, strategy=strategy)
    g = torch.autograd.grad(y, (low[0], low[2], low[3]), gy.to(dtype))
    tl = [t.detach().to(dtype).requires_grad_(True) for t in (x, A, B)]
    _, w, e, _ = reference.route(L.detach(), K)
    yt = torch.zeros(T, O, dtype=dtype, device=CUDA)
    for i in range(E):
        gate = (w * (e == i)).sum(1).to(dtype)
        yt = yt + s * gate[:, None] * ((tl[0] @ tl[1][i].T) @ tl[2][i].T)
    gt = torch.autograd.grad(yt, tl, gy.to(dtype))
    for name, a, b, ref in zip(("y", "dx", "dA", "dB"), [y, *g], [yt, *gt], [y64, *g64]):
        ours = (a.double() - ref).abs().max().item()
        theirs = (b.double() - ref).abs().max().item()
        assert ours <= 2 * theirs + 1e-6, f"{name}: ours {ours:.3g} vs PyTorch {theirs:.3g} ({dtype})"


@pytest.mark.parametrize("dtype", [torch.float64, *LOW])
def test_route_matches_cpu_kernel(dtype):
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(300, 70, generator=g) * 3).to(dtype)
    bias = torch.randn(70, generator=g).to(dtype)
    for K, normalize in ((1, True), (2, True), (8, False), (40, True)):
        cpu = ops.route(logits, K, 0.7, bias, normalize)
        gpu = ops.route(logits.to(CUDA), K, 0.7, bias.to(CUDA), normalize)
        tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(gpu.probs.cpu(), cpu.probs, **tol)
        torch.testing.assert_close(gpu.weights.cpu(), cpu.weights, **tol)
        assert torch.equal(gpu.experts.cpu(), cpu.experts)
        assert torch.equal(gpu.counts.cpu(), cpu.counts)


def test_route_ties_pick_lower_id_on_cuda():
    logits = torch.zeros(4, 6, device=CUDA)
    logits[:, 3] = 1.0
    r = ops.route(logits, 3)
    assert r.experts.tolist() == [[3, 0, 1]] * 4


@pytest.mark.parametrize("normalize", [True, False])
def test_route_backward_matches_cpu_kernel(normalize):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(200, 24, generator=g, dtype=torch.float64)
    r = ops.route(logits, 3, 1.3, None, normalize)
    gp, gw = torch.randn(200, 24, generator=g, dtype=torch.float64), torch.randn(200, 3, generator=g, dtype=torch.float64)
    args = (r.probs, r.weights, r.experts)
    cpu = torch.ops.moe_ext.route_backward(gp, gw, *args, 1.3, normalize)
    gpu = torch.ops.moe_ext.route_backward(gp.to(CUDA), gw.to(CUDA), *(t.to(CUDA) for t in args),
                                           1.3, normalize)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-13, rtol=1e-12)
    no_gp = torch.ops.moe_ext.route_backward(None, gw.to(CUDA), *(t.to(CUDA) for t in args), 1.3,
                                             normalize)
    torch.testing.assert_close(no_gp.cpu(), torch.ops.moe_ext.route_backward(None, gw, *args, 1.3, normalize))


@pytest.mark.parametrize("T,K,bins", [(1, 1, 1), (10, 2, 4), (333, 3, 17), (5000, 2, 8),
                                      (20000, 2, 1030), (65536, 2, 1024), (777, 4, 1)])
def test_align_equals_cpu_kernel(T, K, bins):
    """Stable, so the order is unique: bitwise equal to the CPU kernel."""
    experts = torch.randint(0, bins, (T, K), generator=torch.Generator().manual_seed(T))
    order, offsets = ops.align(experts.to(CUDA), bins)
    want_order, want_offsets = ops.align(experts, bins)
    assert torch.equal(order.cpu(), want_order)
    assert torch.equal(offsets.cpu(), want_offsets)


@pytest.mark.parametrize("dtype", [torch.float64, *LOW])
def test_gate_dense_ops_match_cpu_kernel(dtype):
    g = torch.Generator().manual_seed(7)
    T, E, R, N, K = 90, 5, 6, 1, 3
    r = ops.route(torch.randn(T, E + N, generator=g), K)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = r.weights.to(acc)
    h_all = torch.randn(T, E * R, generator=g).to(dtype)
    grad = torch.randn(T, E * R, generator=g).to(dtype)
    C = torch.ops.moe_ext
    cpu = [C.gate_dense(h_all, w, r.experts, E, N, 0.9),
           *C.gate_dense_backward(grad, h_all, w, r.experts, E, N, 0.9)]
    dev = [t.to(CUDA) for t in (h_all, w, r.experts, grad)]
    gpu = [C.gate_dense(*dev[:3], E, N, 0.9),
           *C.gate_dense_backward(dev[3], *dev[:3], E, N, 0.9)]
    tol = dict(atol=1e-5, rtol=1e-5) if dtype != torch.float64 else {}
    if dtype in (torch.bfloat16, torch.float16):
        tol = dict(atol=2e-2, rtol=2e-2)
    for a, b in zip(gpu, cpu):
        torch.testing.assert_close(a.cpu(), b, **tol)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bitwise_repeatable(strategy):
    x, L, A, B = make_inputs(3000, 256, 192, 16, 16, 1, torch.bfloat16, CUDA, grad=True)
    first = fwd_bwd(x, L, A, B, 2, 1, strategy)
    for _ in range(3):
        again = fwd_bwd(x, L, A, B, 2, 1, strategy)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cuda_graph_capture_of_forward_and_backward(strategy):
    T, D, O, E, R, N, K = 256, 128, 96, 8, 16, 1, 2
    x, L, A, B = make_inputs(T, D, O, E, R, N, torch.float32, CUDA, grad=True)
    gy = torch.randn(T, O, device=CUDA)
    want = fwd_bwd(x, L, A, B, K, N, strategy, gy)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph (allocator, autograd)
        fwd_bwd(x, L, A, B, K, N, strategy, gy)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fwd_bwd(x, L, A, B, K, N, strategy, gy)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # new inputs in place: the replay must follow them
        x.mul_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured[0], fwd_bwd(x, L, A, B, K, N, strategy, gy)[0],
                               atol=1e-5, rtol=1e-5)


def test_large_E_sparse():
    T, D, O, E, R, K = 4096, 128, 128, 1024, 8, 2
    x, L, A, B = make_inputs(T, D, O, E, R, 0, torch.float32, CUDA, grad=True)
    gy = torch.randn(T, O, device=CUDA)
    got = fwd_bwd(x, L, A, B, K, 0, "sparse", gy)
    y_ref = reference.molora(x.double(), L.double(), A.double(), B.double(), K, 0.8)
    want = [y_ref] + list(torch.autograd.grad(y_ref, (x, L, A, B), gy.double()))
    for name, g, w in zip(("y", "dx", "dlogits", "dA", "dB"), got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_large_T(strategy):
    T, D, O, E, R, K = 65536, 64, 64, 8, 16, 2
    x, L, A, B = make_inputs(T, D, O, E, R, 0, torch.float32, CUDA, grad=True)
    got = fwd_bwd(x, L, A, B, K, 0, strategy)
    y_ref = reference.molora(x.double(), L.double(), A.double(), B.double(), K, 0.8)
    want = [y_ref] + list(torch.autograd.grad(y_ref, (x, L, A, B), torch.ones_like(y_ref)))
    for name, g, w in zip(("y", "dx", "dlogits", "dA", "dB"), got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-3, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_expand_runs_in_column_slabs():
    """P * O * 4 bytes > 512 MiB: the K-combine buffer is filled slab by slab (1024 + 76
    columns here), for y in forward and dx in backward; the dense strategy (cuBLAS GEMMs)
    is the comparison."""
    T, D, O, E, R, K = 65536, 1100, 1100, 8, 8, 2
    x, L, A, B = make_inputs(T, D, O, E, R, 0, torch.float32, CUDA, grad=True)
    gy = torch.randn(T, O, device=CUDA)
    sparse = fwd_bwd(x, L, A, B, K, 0, "sparse", gy)
    dense = fwd_bwd(x, L, A, B, K, 0, "dense", gy)
    for name, a, b in zip(("y", "dx", "dlogits", "dA", "dB"), sparse, dense):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_opcheck_on_cuda():
    x, L, A, B = make_inputs(13, 7, 9, 3, 2, 1, torch.float32, CUDA, grad=True)
    r = ops.route(L.detach(), 2)
    w = r.weights.clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.moe_ext.route.default, (L, None, 2, 1.0, True))
    torch.library.opcheck(torch.ops.moe_ext.align.default, (r.experts, 4))
    torch.library.opcheck(torch.ops.moe_ext.lora_forward.default, (x, A, B, w, r.experts, 0.5, 1))
    h_all = torch.randn(13, 6, device=CUDA, requires_grad=True)
    torch.library.opcheck(torch.ops.moe_ext.gate_dense.default, (h_all, w, r.experts, 3, 1, 0.5))


def test_debug_mode_checks_values(monkeypatch):
    monkeypatch.setenv("MOE_EXT_DEBUG", "1")
    logits = torch.randn(5, 4, device=CUDA)
    logits[2, 1] = float("nan")
    with pytest.raises(ValueError, match="router_logits contains non-finite"):
        ops.route(logits, 2)
    with pytest.raises(ValueError, match="experts holds an id outside"):
        ops.align(torch.tensor([[0, 7]], device=CUDA), 4)


def test_out_of_range_ids_add_nothing_without_debug_mode():
    """Without MOE_EXT_DEBUG the ids are not checked (a check would sync), but a bad id
    must act as a null expert: no out-of-bounds access, no effect on any LoRA expert."""
    T, D, O, E, R, K = 40, 24, 20, 2, 4, 2
    x, L, A, B = make_inputs(T, D, O, E, R, 1, torch.float32, CUDA)
    r = ops.route(L, K)
    bad = r.experts.clone()
    bad[bad == E] = 7                              # ids past E + N (N = 0 below)
    bad[0, 1] = -3
    as_null = torch.where((bad < 0) | (bad >= E), torch.full_like(bad, E), bad)
    C = torch.ops.moe_ext

    def fwd_bwd(experts, N):
        y, h = C.lora_forward(x, A, B, r.weights, experts, 0.5, N)
        order, offsets = C.align(experts, E + N)
        gy = torch.ones_like(y)
        return [y, h, *C.lora_backward(gy, x, A, B, r.weights, experts, order, offsets, h, 0.5, N)]

    for got, want in zip(fwd_bwd(bad, 0), fwd_bwd(as_null, 1)):
        torch.testing.assert_close(got, want)


def test_bad_inputs_name_the_argument_on_cuda():
    x, L, A, B = make_inputs(6, 5, 4, 3, 2, 0, torch.float32, CUDA)
    with pytest.raises(ValueError, match="top_k"):
        ops.route(L, 9)
    with pytest.raises(RuntimeError, match="lora_A"):
        torch.ops.moe_ext.lora_forward(x, A.cpu(), B, torch.ones(6, 2, device=CUDA),
                                       torch.zeros(6, 2, dtype=torch.long, device=CUDA), 1.0, 0)
