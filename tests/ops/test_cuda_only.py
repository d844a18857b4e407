"""What only the CUDA path has: CUDA-graph capture of forward + backward, large E and large
T, the column slabs of the K-combine buffer, the MOE_EXT_DEBUG checks and bad ids acting as
null experts. Skipped where there is no GPU. (Parity, dtypes, repeatability and opcheck run
on every device in the per-op test files.)"""
import pytest
import torch

from moe_ext import functional, ops, reference
from conftest import cuda_kernels_present, make_inputs

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and cuda_kernels_present()),
    reason="needs a CUDA device and an extension built with the CUDA kernels")

CUDA = torch.device("cuda")
STRATEGIES = ["sparse", "dense"]


def fwd_bwd(x, L, A, B, K, N, strategy, gy=None):
    y = functional.molora(x, L, A, B, K, 0.8, N, strategy=strategy)
    gy = torch.ones_like(y) if gy is None else gy
    return [y] + list(torch.autograd.grad(y, (x, L, A, B), gy))


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
        y, h, order, offsets = C.lora_forward(x, A, B, r.weights, experts, 0.5, N)
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


def test_bad_order_and_offsets_stay_in_bounds_without_debug_mode(monkeypatch):
    """Without MOE_EXT_DEBUG nothing is read back, but lora_backward clamps order and offsets
    on the device: garbage gives garbage gradients, never an access out of bounds (run under
    compute-sanitizer to see that); with the debug switch it is a ValueError."""
    T, D, O, E, R, K = 40, 24, 20, 3, 4, 2
    x, L, A, B = make_inputs(T, D, O, E, R, 1, torch.float32, CUDA)
    r = ops.route(L, K)
    C = torch.ops.moe_ext
    y, h, _, _ = C.lora_forward(x, A, B, r.weights, r.experts, 0.5, 1)
    g = torch.Generator().manual_seed(0)
    order = torch.randint(-2**62, 2**62, (T * K,), generator=g).to(CUDA)
    offsets = torch.randint(-2**62, 2**62, (E + 2,), generator=g).to(CUDA)
    args = (torch.ones_like(y), x, A, B, r.weights, r.experts, order, offsets, h, 0.5, 1)
    outs = C.lora_backward(*args)
    torch.cuda.synchronize()
    assert [tuple(o.shape) for o in outs] == [(T, D), (T, K), (E, R, D), (E, O, R)]
    monkeypatch.setenv("MOE_EXT_DEBUG", "1")
    with pytest.raises(ValueError, match="offsets|order"):
        C.lora_backward(*args)
