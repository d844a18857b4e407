"""Runs a fuzz case (fuzz_cases.py) and judges how it ended: every call must either return
what an independent float64 reference returns on the same inputs, or raise ValueError /
RuntimeError with a message that names one of the op's arguments. Never a crash (the
subprocess around it catches those), never a torch-internal error, never garbage.
"""
from __future__ import annotations

import re

import torch

from moe_ext.ops import acc_dtype, fallback, reference

from fuzz_cases import MAX_BINS, Case, lora_align, lora_pair_rows


class FuzzFailure(AssertionError):
    pass


def _f64(t):
    return t.double() if isinstance(t, torch.Tensor) else t


# ---- references in float64 on the CPU; each raises when it cannot make sense of the inputs
def ref_route(logits, bias, top_k, temperature, normalize):
    if not 1 <= top_k <= logits.shape[-1] or not 0 < temperature < float("inf"):
        raise ValueError("reference: top_k or temperature out of range")
    if not torch.isfinite(logits).all() or (bias is not None and not torch.isfinite(bias).all()):
        raise ValueError("reference: non-finite logits")
    acc = acc_dtype(logits.dtype)  # the op rounds the bias to the routing dtype first
    return reference.route(_f64(logits), top_k, temperature,
                           None if bias is None else _f64(bias.to(acc)), normalize)


def ref_route_backward(gp, gw, probs, weights, experts, temperature, normalize):
    if gp is not None and gp.shape != probs.shape:
        raise ValueError("reference: grad_probs shape")
    if not (gw.shape == weights.shape == experts.shape) or not 0 < temperature < float("inf"):
        raise ValueError("reference: shapes or temperature")
    gp, gw, weights = (None if t is None else t.to(probs.dtype) for t in (gp, gw, weights))
    return fallback.route_backward(_f64(gp), _f64(gw), _f64(probs), _f64(weights), experts,
                                   temperature, normalize)


def ref_align(experts, num_bins):
    if num_bins > MAX_BINS:
        raise ValueError("reference: too many bins")  # and never allocate them
    return reference.align(experts, num_bins)


def _check_ids(experts, E, N):
    if experts.dtype != torch.int64 or N < 0 or ((experts < 0) | (experts >= E + N)).any():
        raise ValueError("reference: expert ids out of range")


def ref_lora_forward(x, A, B, w, experts, scaling, N):
    _check_ids(experts, A.shape[0], N)
    if w.shape != experts.shape or x.shape[0] != w.shape[0]:
        raise ValueError("reference: routing shapes")
    y = reference.lora_delta(_f64(x), _f64(A), _f64(B), _f64(w), experts, scaling)
    return (y, lora_pair_rows(x, A, experts), *lora_align(experts, A.shape[0]))


def ref_lora_backward(gy, x, A, B, w, experts, order, offsets, h, scaling, N):
    """Explicit formulas from the given h (the op's contract), pair by pair."""
    E, T, K = A.shape[0], experts.shape[0], experts.shape[1]
    _check_ids(experts, E, N)
    if (w.shape != experts.shape or x.shape[0] != T or gy.shape != (T, B.shape[1])
            or h.shape != (T * K, A.shape[1])):
        raise ValueError("reference: shapes")
    gy, h = gy.to(x.dtype), h.to(acc_dtype(x.dtype))  # as the op converts them
    gy, x, A, B, w, h = (_f64(t) for t in (gy, x, A, B, w, h))
    lora = experts.flatten() < E
    idx = torch.where(lora, experts.flatten(), torch.zeros_like(experts.flatten()))
    tok = torch.arange(T * K) // K
    mask = lora.double()[:, None]
    gh = torch.einsum("por,po->pr", B[idx], gy[tok]) * mask                # B_e^T dy
    dw = scaling * (gh * h).sum(-1) * lora
    dh = scaling * w.flatten()[:, None] * gh
    dx = torch.zeros_like(x).index_add_(0, tok, torch.einsum("prd,pr->pd", A[idx], dh))
    dA = torch.zeros_like(A).index_add_(0, idx, torch.einsum("pr,pd->prd", dh, x[tok]))
    coef = scaling * w.flatten()[:, None] * h * mask
    dB = torch.zeros_like(B).index_add_(0, idx, torch.einsum("po,pr->por", gy[tok], coef))
    return dx, dw.view(T, K), dA, dB


def ref_lora_dense_forward(x, A, B, w, experts, scaling, N):
    y = ref_lora_forward(x, A, B, w, experts, scaling, N)[0]
    return y, _f64(x) @ _f64(A).flatten(0, 1).T


def ref_lora_dense_backward(gy, x, A, B, w, experts, h_all, scaling, N):
    """ref_lora_backward on the pair rows of the given h_all (the op's contract)."""
    E, R = A.shape[0], A.shape[1]
    _check_ids(experts, E, N)
    if h_all.shape != (x.shape[0], E * R) or w.shape != experts.shape:
        raise ValueError("reference: shapes")
    h3 = _f64(h_all.to(x.dtype)).view(-1, E, R)  # as the op converts it
    lora = experts < E
    idx = torch.where(lora, experts, torch.zeros_like(experts))
    h = (h3.gather(1, idx[:, :, None].expand(-1, -1, R)) * lora[:, :, None]).reshape(-1, R)
    order, offsets = lora_align(experts, E)
    return ref_lora_backward(gy, x, A, B, w, experts, order, offsets, h, scaling, N)


def _expand_inputs(h_all, B, w, experts, N):
    """The expand's inputs as its kernels read them: h_all in float64, shapes checked."""
    E, R = B.shape[0], B.shape[2]
    _check_ids(experts, E, N)
    if h_all.shape != (experts.shape[0], E * R) or w.shape != experts.shape:
        raise ValueError("reference: shapes")
    return _f64(h_all), _f64(B), _f64(w)


def ref_lora_dense_expand(h_all, B, w, experts, scaling, N):
    h, B, w = _expand_inputs(h_all, B, w, experts, N)
    return (reference.lora_dense_expand(h, B, w, experts, scaling),)


def ref_lora_dense_expand_backward(gy, h_all, B, w, experts, scaling, N):
    """The gradients of <grad_y, y> by autograd through the float64 reference."""
    h, B, w = (t.requires_grad_(True) for t in _expand_inputs(h_all, B, w, experts, N))
    if gy.shape != (h.shape[0], B.shape[1]):
        raise ValueError("reference: shapes")
    y = reference.lora_dense_expand(h, B, w, experts, scaling)
    dh, dB, dw = torch.autograd.grad(y, (h, B, w), _f64(gy.to(h_all.dtype)), allow_unused=True)
    zeros = lambda g, t: torch.zeros_like(t) if g is None else g  # noqa: E731  (T = 0)
    return zeros(dh, h), zeros(dw, w), zeros(dB, B)


REFERENCES = {"route": ref_route, "route_backward": ref_route_backward, "align": ref_align,
              "lora_forward": ref_lora_forward, "lora_backward": ref_lora_backward,
              "lora_dense_forward": ref_lora_dense_forward,
              "lora_dense_backward": ref_lora_dense_backward,
              "lora_dense_expand": ref_lora_dense_expand,
              "lora_dense_expand_backward": ref_lora_dense_expand_backward}
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def call(op: str, args: list):
    """(outputs as a tuple, None) or (None, the exception)."""
    try:
        out = getattr(torch.ops.moe_ext, op)(*args)
    except Exception as e:  # judged by the caller
        return None, e
    return (out if isinstance(out, tuple) else (out,)), None


def names_an_argument(message: str, names) -> bool:
    return any(re.search(rf"\b{re.escape(n)}\b", message) for n in names)


def check_error(case: Case, err: BaseException, where: str) -> None:
    if not isinstance(err, (ValueError, RuntimeError)) or not names_an_argument(str(err), case.names):
        raise FuzzFailure(f"{where}: {type(err).__name__} that names no argument of {case.op}: "
                          f"{str(err)[:300]}\n  case: {case.describe()}")


def assert_matches(got, want, case: Case) -> None:
    if len(got) != len(want):
        raise FuzzFailure(f"{len(got)} outputs, the reference has {len(want)}: {case.describe()}")
    for i, (g, w) in enumerate(zip(got, want)):
        g = g.cpu()
        if g.shape != w.shape:
            raise FuzzFailure(f"output {i} has shape {tuple(g.shape)}, the reference "
                              f"{tuple(w.shape)}: {case.describe()}")
        if not g.is_floating_point():
            if not torch.equal(g, w.to(g.dtype)):
                raise FuzzFailure(f"output {i} (ids) differs from the reference: {case.describe()}")
            continue
        want_here = w.to(g.dtype).double()  # rounded (and overflowed) as the op's output is
        finite = want_here[torch.isfinite(want_here)]
        scale = float(finite.abs().max()) if finite.numel() else 1.0
        tol = TOLERANCE[g.dtype]
        try:
            torch.testing.assert_close(g.double(), want_here, rtol=tol, atol=tol * max(scale, 1e-30),
                                       equal_nan=True)
        except AssertionError as e:
            raise FuzzFailure(f"output {i} differs from the reference: {case.describe()}\n{e}")


def route_outputs_match(got, want, case: Case) -> None:
    """Near-ties may be ordered differently by float32 and the float64 reference, so the
    chosen experts must carry the reference's top-K probabilities, not the same ids."""
    probs, weights, experts, counts = (t.cpu() for t in got)
    ref_probs, ref_weights, ref_experts, _ = want
    assert_matches((probs, weights), (ref_probs, ref_weights), case)
    if experts.shape != ref_experts.shape or experts.dtype != torch.int64:
        raise FuzzFailure(f"experts shape/dtype {tuple(experts.shape)} {experts.dtype}: {case.describe()}")
    if experts.numel() and ((experts < 0) | (experts >= probs.shape[1])).any():
        raise FuzzFailure(f"route returned an id outside [0, M): {case.describe()}")
    assert_matches((ref_probs.gather(1, experts),), (ref_probs.gather(1, ref_experts),), case)
    want_counts = reference.bin_counts(experts, probs.shape[1])
    if not torch.equal(counts, want_counts):
        raise FuzzFailure(f"counts differ from the chosen ids: {case.describe()}")


def judge_outputs(case: Case, args: list, out) -> None:
    try:
        want = REFERENCES[case.op](*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
    except Exception as e:
        raise FuzzFailure(f"op accepted inputs the reference refuses ({type(e).__name__}: "
                          f"{str(e)[:200]}): {case.describe()}")
    want = want if isinstance(want, tuple) else (want,)
    if case.op == "route":
        route_outputs_match(out, want, case)
    else:
        assert_matches(out, want, case)


def run_case(case: Case, device: str = "cpu") -> str:
    """Runs the case on `device` (and on meta if asked); returns "result" or "error", raises
    FuzzFailure when the outcome breaks the rules."""
    args = [a.to(device) if isinstance(a, torch.Tensor) and a.device.type != "meta" else a
            for a in case.args]
    devices = {a.device.type for a in args if isinstance(a, torch.Tensor)}
    if devices == {"meta"}:
        return run_meta(case, args, None)
    expect = "invalid" if "meta" in devices else case.expect  # meta mixed with real tensors
    out, err = call(case.op, args)
    if err is not None:
        check_error(case, err, "error")
        if expect == "valid":
            raise FuzzFailure(f"valid inputs refused: {str(err)[:300]}\n  case: {case.describe()}")
    else:
        if expect == "invalid":
            raise FuzzFailure(f"invalid inputs accepted: {case.describe()}")
        judge_outputs(case, args, out)
    if case.all_meta:
        run_meta(case, [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args], out)
    return "error" if err is not None else "result"


def run_meta(case: Case, meta_args: list, real_out) -> str:
    """Every tensor on meta (the fake kernels): a named error, or meta outputs shaped like
    the real run's (when there was one that returned)."""
    out, err = call(case.op, meta_args)
    if err is not None:
        check_error(case, err, "meta")
        return "error"
    for i, m in enumerate(out):
        if m.device.type != "meta":
            raise FuzzFailure(f"meta inputs gave output {i} on {m.device}: {case.describe()}")
    for g, m in zip(real_out or (), out):
        if m.shape != g.shape or m.dtype != g.dtype:
            raise FuzzFailure(f"meta output {tuple(m.shape)} {m.dtype} but {tuple(g.shape)} "
                              f"{g.dtype} on {g.device}: {case.describe()}")
    return "result"
