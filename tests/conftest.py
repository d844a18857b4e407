"""Shared test helpers: devices, dtype tolerances, random MoLoRA inputs."""
import pytest
import torch

import moe_ext  # noqa: F401  (loads the ops)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))]


def cuda_kernels_present() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("moe_ext::lora_forward", "CUDA")


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cuda" and not cuda_kernels_present():
        pytest.skip("extension built without CUDA kernels")
    return torch.device(request.param)


def make_inputs(T, D, O, E, R, N=0, dtype=torch.float32, device="cpu", seed=0, grad=False,
                logit_scale=1.0):
    """x (T, D), router_logits (T, E+N), lora_A (E, R, D), lora_B (E, O, R)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    logits = torch.randn(T, E + N, generator=g, dtype=torch.float64) * logit_scale
    A = torch.randn(E, R, D, generator=g, dtype=torch.float64) / D ** 0.5
    B = torch.randn(E, O, R, generator=g, dtype=torch.float64) / R ** 0.5
    out = [t.to(device=device, dtype=dtype).requires_grad_(grad) for t in (x, logits, A, B)]
    return out
