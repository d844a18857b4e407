"""The dense-gated strategy's ops (lora_dense_forward / lora_dense_backward, and the expand
alone: lora_dense_expand / lora_dense_expand_backward) against a float64 reference, on every
device. The shapes cover both CUDA paths: the fused tensor-core forward
(bf16 / fp16, E*R <= 256 padded to 16 .. 256 columns, R, D, O multiples of 8, T not a
multiple of the 64-token block) and the generic one (odd R, D, O; fp32 / fp64)."""
import pytest
import torch

from moe_ext import ops, reference
from conftest import make_inputs

C = torch.ops.moe_ext
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float64: dict(atol=1e-12, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=2e-5),
       torch.bfloat16: dict(atol=4e-2, rtol=4e-2), torch.float16: dict(atol=6e-3, rtol=6e-3)}

# (T, D, O, E, R, N, K)
SHAPES = [
    (1, 8, 8, 1, 8, 0, 1),          # one token, E*R = 8 (padded to 16), K = 1
    (70, 40, 24, 2, 8, 1, 2),       # T past one block, null expert, E*R = 16
    (65, 24, 72, 3, 8, 0, 2),       # E*R = 24 (padded to 32), O past one 64-column stage
    (130, 72, 136, 4, 16, 2, 3),    # E*R = 64, D past two 32-column stages
    (64, 16, 16, 8, 16, 0, 8),      # K = E (every expert), E*R = 128
    (33, 48, 40, 16, 16, 1, 5),     # E*R = 256, the widest fused case
    (37, 19, 23, 4, 5, 0, 2),       # odd D, O, R: the generic path
    (20, 16, 16, 40, 8, 0, 2),      # E*R = 320 > 256: the generic path
]


def _routing(T, E, N, K, dtype, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    r = reference.route(torch.randn(T, E + N, generator=g, dtype=torch.float64), K)
    return r[1].to(device, ops.acc_dtype(dtype)), r[2].to(device)


def _reference(x, A, B, w, experts, s, grad_y):
    """y, h_all and the gradients of <grad_y, y> to x, w, A, B, all in float64."""
    x, A, B, w = (t.detach().double().cpu().requires_grad_(True) for t in (x, A, B, w))
    experts = experts.cpu()
    y, h_all = reference.lora_dense(x, A, B, w, experts, s)
    dx, dw, dA, dB = torch.autograd.grad(y, (x, w, A, B), grad_y.double().cpu())
    return y, h_all, dx, dw, dA, dB


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T%d_D%d_O%d_E%d_R%d_N%d_K%d" % s)
def test_forward_backward_match_float64_reference(device, dtype, shape):
    T, D, O, E, R, N, K = shape
    x, _, A, B = make_inputs(T, D, O, E, R, N, dtype, device)
    w, experts = _routing(T, E, N, K, dtype, device)
    grad_y = torch.randn(T, O, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    y, h_all = C.lora_dense_forward(x, A, B, w, experts, 0.7, N)
    got = (y, h_all) + tuple(C.lora_dense_backward(grad_y, x, A, B, w, experts, h_all, 0.7, N))
    want = _reference(x, A, B, w, experts, 0.7, grad_y)
    assert y.dtype == h_all.dtype == dtype and got[3].dtype == w.dtype
    for name, g, ref in zip(("y", "h_all", "dx", "dw", "dA", "dB"), got, want):
        scale = max(ref.abs().max().item(), 1.0)
        tol = dict(atol=TOL[dtype]["atol"] * scale, rtol=TOL[dtype]["rtol"])
        torch.testing.assert_close(g.cpu().double(), ref.detach(), **tol,
                                   msg=lambda m: f"{name}: {m}")


def test_repeated_ids_sum_and_unchosen_experts_get_zero_gradient(device):
    """A repeated id sums its slots' weights (k order); experts nobody chose get dA = dB = 0."""
    T, D, O, E, R = 9, 16, 8, 4, 8
    x, _, A, B = make_inputs(T, D, O, E, R, 1, torch.float64, device)
    w = torch.rand(T, 3, dtype=torch.float64, device=device)
    experts = torch.tensor([[1, 1, 4]] * T, device=device)  # expert 1 twice, null expert 4
    y, h_all = C.lora_dense_forward(x, A, B, w, experts, 0.5, 1)
    want = reference.lora_delta(x, A, B, w, experts, 0.5)
    torch.testing.assert_close(y, want, atol=1e-12, rtol=1e-10)
    dx, dw, dA, dB = C.lora_dense_backward(torch.ones(T, O, dtype=torch.float64, device=device), x,
                                           A, B, w, experts, h_all, 0.5, 1)
    assert torch.equal(dw[:, 0], dw[:, 1]) and (dw[:, 2] == 0).all()
    for e in (0, 2, 3):
        assert (dA[e] == 0).all() and (dB[e] == 0).all()


def test_autograd_matches_reference_and_gradgradcheck():
    x, _, A, B = make_inputs(11, 6, 5, 3, 2, 1, torch.float64, grad=True)
    w, experts = _routing(11, 3, 1, 2, torch.float64, "cpu")
    w.requires_grad_(True)
    fn = lambda x, A, B, w: ops.lora_dense(x, A, B, w, experts, 0.8, 1)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, A, B, w))
    assert torch.autograd.gradgradcheck(fn, (x, A, B, w))


def test_opcheck(device):
    x, _, A, B = make_inputs(13, 16, 8, 3, 8, 1, torch.float32, device, grad=True)
    w, experts = _routing(13, 3, 1, 2, torch.float32, device)
    w.requires_grad_(True)
    torch.library.opcheck(C.lora_dense_forward.default, (x, A, B, w, experts, 0.5, 1))
    y, h_all = C.lora_dense_forward(x, A, B, w, experts, 0.5, 1)
    torch.library.opcheck(C.lora_dense_backward.default,
                          (torch.randn_like(y), x.detach(), A.detach(), B.detach(), w.detach(),
                           experts, h_all.detach(), 0.5, 1))


def test_rejects_bad_ids_and_scalars_naming_them():
    x, _, A, B = make_inputs(6, 8, 4, 3, 2)
    w, experts = _routing(6, 3, 0, 2, torch.float32, "cpu")
    bad = experts.clone()
    bad[0, 0] = 3  # no null experts: id 3 is out of range
    with pytest.raises(ValueError, match="experts"):
        ops.lora_dense(x, A, B, w, bad, 1.0)
    for s, N, name in [(float("nan"), 0, "scaling"), (float("inf"), 0, "scaling"),
                       (1.0, -1, "num_null_experts"), (1.0, 2**63 - 1, "num_null_experts")]:
        with pytest.raises(ValueError, match=name):
            C.lora_dense_forward(x, A, B, w, experts, s, N)
    y, h_all = C.lora_dense_forward(x, A, B, w, experts, 1.0, 0)
    with pytest.raises(ValueError, match="h_all"):
        C.lora_dense_backward(y, x, A, B, w, experts, h_all[:, :5], 1.0, 0)
    with pytest.raises(ValueError, match="grad_y"):
        C.lora_dense_backward(y[:, :3], x, A, B, w, experts, h_all, 1.0, 0)
    with pytest.raises(RuntimeError, match="lora_B"):
        C.lora_dense_forward(x, A, B.double(), w, experts, 1.0, 0)


def test_no_tokens():
    x, _, A, B = make_inputs(0, 8, 4, 3, 2)
    w, e = torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.long)
    y, h_all = C.lora_dense_forward(x, A, B, w, e, 1.0, 1)
    assert y.shape == (0, 4) and h_all.shape == (0, 6)
    dx, dw, dA, dB = C.lora_dense_backward(y, x, A, B, w, e, h_all, 1.0, 1)
    assert dx.shape == (0, 8) and dw.shape == (0, 2) and (dA == 0).all() and (dB == 0).all()


# ---- lora_dense_expand: the expand alone, from a given h_all (MoLoRALinear's router fusion)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T%d_D%d_O%d_E%d_R%d_N%d_K%d" % s)
def test_expand_forward_backward_match_float64_reference(device, dtype, shape):
    T, D, O, E, R, N, K = shape
    _, _, _, B = make_inputs(T, D, O, E, R, N, dtype, device)
    g = torch.Generator().manual_seed(3)
    h_all = torch.randn(T, E * R, generator=g).to(device, dtype)
    w, experts = _routing(T, E, N, K, dtype, device)
    grad_y = torch.randn(T, O, generator=g).to(device, dtype)
    y = C.lora_dense_expand(h_all, B, w, experts, 0.7, N)
    dh, dw, dB = C.lora_dense_expand_backward(grad_y, h_all, B, w, experts, 0.7, N)
    assert y.dtype == dh.dtype == dB.dtype == dtype and dw.dtype == w.dtype
    h64, B64, w64 = (t.detach().double().cpu().requires_grad_(True) for t in (h_all, B, w))
    y64 = reference.lora_dense_expand(h64, B64, w64, experts.cpu(), 0.7)
    want = (y64,) + torch.autograd.grad(y64, (h64, w64, B64), grad_y.double().cpu())
    for name, got, ref in zip(("y", "grad_h_all", "grad_weights", "grad_B"), (y, dh, dw, dB), want):
        scale = max(ref.abs().max().item(), 1.0)
        tol = dict(atol=TOL[dtype]["atol"] * scale, rtol=TOL[dtype]["rtol"])
        torch.testing.assert_close(got.cpu().double(), ref.detach(), **tol,
                                   msg=lambda m: f"{name}: {m}")


def test_expand_equals_dense_forward_from_its_h_all(device):
    """lora_dense_forward = lora_dense_expand of its own h_all, and the expand's gradients
    are the dense backward's (dx = grad_h_all A_all, dA = grad_h_all^T x)."""
    T, D, O, E, R, N = 21, 16, 8, 3, 8, 1
    x, _, A, B = make_inputs(T, D, O, E, R, N, torch.float64, device)
    w, experts = _routing(T, E, N, 2, torch.float64, device)
    y, h_all = C.lora_dense_forward(x, A, B, w, experts, 0.6, N)
    torch.testing.assert_close(C.lora_dense_expand(h_all, B, w, experts, 0.6, N), y)
    dy = torch.randn_like(y)
    dx, dw, dA, dB = C.lora_dense_backward(dy, x, A, B, w, experts, h_all, 0.6, N)
    dh, dw2, dB2 = C.lora_dense_expand_backward(dy, h_all, B, w, experts, 0.6, N)
    torch.testing.assert_close(dh @ A.reshape(E * R, D), dx)
    torch.testing.assert_close((dh.T @ x).view(E, R, D), dA)
    torch.testing.assert_close(dw2, dw)
    torch.testing.assert_close(dB2, dB)


def test_expand_autograd_gradgradcheck_and_opcheck(device):
    T, O, E, R, N = 11, 5, 3, 2, 1
    g = torch.Generator().manual_seed(4)
    h_all = torch.randn(T, E * R, generator=g, dtype=torch.float64).to(device).requires_grad_()
    B = torch.randn(E, O, R, generator=g, dtype=torch.float64).to(device).requires_grad_()
    w, experts = _routing(T, E, N, 2, torch.float64, device)
    w.requires_grad_(True)
    fn = lambda h, B, w: ops.lora_dense_expand(h, B, w, experts, 0.8, N)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h_all, B, w))
    assert torch.autograd.gradgradcheck(fn, (h_all, B, w))
    torch.library.opcheck(C.lora_dense_expand.default, (h_all, B, w, experts, 0.5, N))
    y = C.lora_dense_expand(h_all, B, w, experts, 0.5, N)
    torch.library.opcheck(C.lora_dense_expand_backward.default,
                          (torch.randn_like(y), h_all.detach(), B.detach(), w.detach(), experts,
                           0.5, N))


def test_expand_rejects_bad_input_naming_it():
    h_all, B = torch.randn(6, 6), torch.randn(3, 4, 2)
    w, experts = _routing(6, 3, 0, 2, torch.float32, "cpu")
    bad = experts.clone()
    bad[0, 0] = 3
    with pytest.raises(ValueError, match="experts"):
        C.lora_dense_expand(h_all, B, w, bad, 1.0, 0)
    with pytest.raises(ValueError, match="h_all"):
        C.lora_dense_expand(h_all[:, :5], B, w, experts, 1.0, 0)
    with pytest.raises(ValueError, match="weights"):
        C.lora_dense_expand(h_all[:4], B, w, experts, 1.0, 0)
    with pytest.raises(ValueError, match="scaling"):
        C.lora_dense_expand(h_all, B, w, experts, float("nan"), 0)
    with pytest.raises(RuntimeError, match="lora_B"):
        C.lora_dense_expand(h_all, B.double(), w, experts, 1.0, 0)
    with pytest.raises(ValueError, match="lora_B"):
        C.lora_dense_expand(h_all, B[:, :, :0], w, experts, 1.0, 0)
    with pytest.raises(ValueError, match="grad_y"):
        C.lora_dense_expand_backward(torch.randn(6, 3), h_all, B, w, experts, 1.0, 0)
    y = C.lora_dense_expand(h_all[:0], B, w[:0], experts[:0], 1.0, 1)  # no tokens
    dh, dw, dB = C.lora_dense_expand_backward(y, h_all[:0], B, w[:0], experts[:0], 1.0, 1)
    assert y.shape == (0, 4) and dh.shape == (0, 6) and dw.shape == (0, 2) and (dB == 0).all()
