"""functional.molora as an API: leading batch dims, strategy choice, torch.compile, clear
errors for bad arguments (the numerics are in tests/ops/test_lora.py)."""
import pytest
import torch

from moe_ext import functional
from conftest import make_inputs


def test_leading_batch_dims():
    x, L, A, B = make_inputs(24, 10, 12, 4, 3, dtype=torch.float64)
    y = functional.molora(x.view(2, 3, 4, 10), L.view(2, 3, 4, 4), A, B, 2, 1.0)
    assert y.shape == (2, 3, 4, 12)
    torch.testing.assert_close(y.reshape(24, 12), functional.molora(x, L, A, B, 2, 1.0))


def test_strategies_agree_and_auto_is_one_of_them():
    x, L, A, B = make_inputs(77, 31, 29, 6, 4, 1, torch.float32)
    ys = {s: functional.molora(x, L, A, B, 3, 1.0, 1, strategy=s) for s in ("auto", "sparse", "dense")}
    torch.testing.assert_close(ys["sparse"], ys["dense"], atol=1e-5, rtol=1e-5)
    assert functional.choose_strategy(6, 3, 4, x.device) in ("sparse", "dense")
    assert functional.choose_strategy(4, 4, 4, x.device) == "dense"
    assert functional.choose_strategy(8, 2, 16, x.device) == "sparse"
    cuda = torch.device("cuda")  # a device object only: no GPU needed
    assert functional.choose_strategy(8, 2, 16, cuda) == "dense"     # E*R = 128
    assert functional.choose_strategy(64, 2, 16, cuda) == "sparse"   # E*R = 1024


def test_torch_compile_fullgraph():
    x, L, A, B = make_inputs(21, 8, 10, 4, 3, 1, torch.float32, grad=True)

    def f(x, L, A, B):
        return functional.molora(x, L, A, B, 2, 1.0, 1).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(x, L, A, B)
    want = f(x, L, A, B)
    torch.testing.assert_close(got, want)
    g1 = torch.autograd.grad(got, (x, A, B))
    g2 = torch.autograd.grad(want, (x, A, B))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_bad_inputs_name_the_argument():
    x, L, A, B = make_inputs(6, 5, 4, 3, 2)
    cases = [
        (dict(x=x[:, :4]), ValueError, "x has 4 features"),
        (dict(router_logits=L[:, :2]), ValueError, "router_logits"),
        (dict(lora_A=A[0]), ValueError, "lora_A"),
        (dict(lora_B=B[:, :, :1]), ValueError, "lora_B"),
        (dict(top_k=4), ValueError, "top_k"),
        (dict(top_k=0), ValueError, "top_k"),
        (dict(lora_A=A.double()), ValueError, "lora_A dtype"),
        (dict(x=x.long(), lora_A=A.long(), lora_B=B.long()), ValueError, "x must be a floating"),
        (dict(num_null_experts=-1), ValueError, "num_null_experts"),
        (dict(strategy="fast"), ValueError, "strategy"),
        (dict(lora_A=A.to("meta")), ValueError, "lora_A is on meta but x is on cpu"),
        (dict(logit_bias=torch.zeros(3, device="meta")), ValueError, "logit_bias is on meta"),
        (dict(logit_bias=torch.zeros(4)), ValueError, "logit_bias must be a tensor of shape"),
        (dict(logit_bias=[0.0] * 3), ValueError, "logit_bias must be a tensor"),
        (dict(logit_bias=torch.zeros(3, dtype=torch.long)), ValueError, "logit_bias must be a floating"),
        (dict(scaling=float("nan")), ValueError, "scaling"),
        (dict(temperature=0.0), ValueError, "temperature"),
    ]
    base = dict(x=x, router_logits=L, lora_A=A, lora_B=B, top_k=2, scaling=1.0)
    for change, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            functional.molora(**{**base, **change})
    bad = L.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="router_logits"):
        functional.molora(**{**base, "router_logits": bad})


def test_dense_strategy_split_at_the_shrink():
    """dense_shrink_with_router + molora_from_shrink (one GEMM over x for the shrink and the
    router logits) equal molora with the router's logits, gradients included."""
    x, _, A, B = make_inputs(19, 10, 7, 4, 3, 2, torch.float64, grad=True)
    Wr = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    h_all, logits = functional.dense_shrink_with_router(x, A, Wr)
    assert h_all.shape == (19, 12) and logits.shape == (19, 6)
    got = functional.molora_from_shrink(h_all, logits, B, 2, 0.5, 2, temperature=0.7)
    want = functional.molora_with_routing(x, x @ Wr.T, A, B, 2, 0.5, 2, temperature=0.7,
                                          strategy="dense")
    torch.testing.assert_close(got.delta, want.delta)
    assert torch.equal(got.experts, want.experts)
    g = torch.randn(19, 7, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((got.delta * g).sum(), (x, A, B, Wr)),
                    torch.autograd.grad((want.delta * g).sum(), (x, A, B, Wr))):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="router_weight"):
        functional.dense_shrink_with_router(x, A, Wr[:, :4])
    with pytest.raises(ValueError, match="x must"):
        functional.dense_shrink_with_router(x[:, :4], A, Wr)
    with pytest.raises(ValueError, match="router_logits"):
        functional.molora_from_shrink(h_all, logits[:, :5], B, 2, 0.5, 2)
    with pytest.raises(ValueError, match="lora_B"):
        functional.molora_from_shrink(h_all, logits, B[0], 2, 0.5, 2)
