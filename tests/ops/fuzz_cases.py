"""Random direct calls of the torch.ops.moe_ext ops with mutated inputs, for the fuzz test
(tests/ops/test_fuzz.py, through fuzz_main.py in a subprocess) and the crash campaign
(experiments/fuzz_campaign.py).

A case starts from valid inputs of one op at small random shapes, then takes up to three
mutations. Each mutation gives a verdict: "valid" (the op must return the reference's
result), "invalid" (the op must raise ValueError / RuntimeError naming an argument) or
"either" (e.g. a dtype the op may convert or refuse). The case's verdict is the strictest:
invalid, then either, then valid. fuzz_check.py runs a case and judges the outcome.

Notation (docs/architecture.md#notation): T tokens, D/O features, E LoRA experts, N null
experts, M = E + N, K experts per token, R rank, P = T * K pairs.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from moe_ext.ops import reference

FAMILIES = ("route", "align", "lora", "lora_dense")
FLOATS = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
ANY_DTYPES = FLOATS + (torch.int64, torch.int32, torch.bool)
BAD_IDS = (-1, -(2**63), 2**62, 2**63 - 1)
HUGE_INTS = (2**31, 2**62, 2**63 - 1)
MAX_BINS = 2**24  # align refuses more bins (csrc/checks.h: kMaxBins)
NAMES = {
    "route": ("router_logits", "logit_bias", "top_k", "temperature", "normalize_weights"),
    "route_backward": ("grad_probs", "grad_weights", "probs", "weights", "experts", "temperature",
                       "normalize_weights"),
    "align": ("experts", "num_bins"),
    "lora_forward": ("x", "lora_A", "lora_B", "weights", "experts", "scaling", "num_null_experts"),
    "lora_backward": ("grad_y", "x", "lora_A", "lora_B", "weights", "experts", "order", "offsets",
                      "h", "scaling", "num_null_experts"),
    "lora_dense_forward": ("x", "lora_A", "lora_B", "weights", "experts", "scaling",
                           "num_null_experts"),
    "lora_dense_backward": ("grad_y", "x", "lora_A", "lora_B", "weights", "experts", "h_all",
                            "scaling", "num_null_experts"),
    "lora_dense_expand": ("h_all", "lora_B", "weights", "experts", "scaling", "num_null_experts"),
    "lora_dense_expand_backward": ("grad_y", "h_all", "lora_B", "weights", "experts", "scaling",
                                   "num_null_experts"),
}
RANK = {"valid": 0, "either": 1, "invalid": 2}


@dataclass
class Case:
    op: str
    args: list
    expect: str = "valid"
    mutations: list = field(default_factory=list)
    all_meta: bool = False  # run once on the CPU and once with every tensor on meta

    @property
    def names(self) -> tuple:
        return NAMES[self.op]

    def mutate(self, what: str, verdict: str) -> None:
        self.mutations.append(f"{what}:{verdict}")
        if RANK[verdict] > RANK[self.expect]:
            self.expect = verdict

    def describe(self) -> str:
        def one(a):
            if isinstance(a, torch.Tensor):
                return f"T{tuple(a.shape)}{str(a.dtype)[6:]}@{a.device.type}"
            return repr(a)
        meta = " all_meta" if self.all_meta else ""
        return f"{self.op}({', '.join(one(a) for a in self.args)}){meta} [{', '.join(self.mutations)}]"


def _data(rng: random.Random, *shape, dtype=torch.float64, scale=1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _size(rng: random.Random, small: int, big: tuple) -> int:
    """Mostly small; now and then past a kernel's block (128 tokens, 256 columns)."""
    return rng.randint(*big) if rng.random() < 0.1 else rng.randint(0, small)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _routing(rng, T, M, K):
    logits = _data(rng, T, M)
    _, w, e, _ = reference.route(logits, K, 1.0, None, rng.random() < 0.5)
    return w, e


# ---- generic mutations of any tensor argument
def _tensor_slots(case):
    return [i for i, a in enumerate(case.args) if isinstance(a, torch.Tensor)]


def mutate_dtype(case, rng):
    i = rng.choice(_tensor_slots(case))
    new = rng.choice([d for d in ANY_DTYPES if d != case.args[i].dtype])
    case.args[i] = case.args[i].to(new)
    case.mutate(f"dtype({case.names[i]}->{str(new)[6:]})", "either")


def mutate_shape(case, rng):
    i = rng.choice(_tensor_slots(case))
    t = case.args[i]
    how = rng.choice(["unsqueeze", "flatten", "shrink", "grow"])
    if how == "unsqueeze":
        t = t.unsqueeze(0)
    elif how == "flatten":
        t = t.flatten()
    else:
        d = rng.randrange(t.dim()) if t.dim() else None
        if d is None:
            return
        if how == "shrink" and t.shape[d] > 0:
            t = t.narrow(d, 0, t.shape[d] - 1)
        else:
            t = torch.cat([t, t.narrow(d, 0, min(1, t.shape[d]))], d)
    case.args[i] = t
    case.mutate(f"shape({case.names[i]},{how})", "either")


def mutate_layout(case, rng):
    """Same values, non-contiguous strides."""
    i = rng.choice(_tensor_slots(case))
    t = case.args[i]
    case.args[i] = torch.stack([t, t], -1)[..., 0]
    case.mutate(f"strided({case.names[i]})", "valid")


def mutate_meta_one(case, rng):
    """Invalid while another tensor stays real (fuzz_check.run_case decides)."""
    i = rng.choice(_tensor_slots(case))
    case.args[i] = case.args[i].to("meta")
    case.mutations.append(f"meta({case.names[i]})")


def mutate_all_meta(case, rng):
    case.all_meta = True
    case.mutations.append("all_meta")


GENERIC = (mutate_dtype, mutate_shape, mutate_layout, mutate_meta_one, mutate_all_meta)


# ---- value mutations shared by several ops
def set_bad_id(case, slot, rng, num_ids=None):
    """An id outside [0, num_ids) in the int tensor at `slot`."""
    t = case.args[slot]
    if t.numel() == 0 or t.dtype != torch.int64 or t.device.type == "meta":
        return
    choices = list(BAD_IDS) + ([num_ids] if num_ids is not None and num_ids < 2**40 else [])
    t = t.clone()
    t.view(-1)[rng.randrange(t.numel())] = rng.choice(choices)
    case.args[slot] = t
    case.mutate(f"bad_id({case.names[slot]})", "invalid")


def set_scaling(case, slot, rng):
    # 1e39 is finite in float64 but not in float32, the accumulation dtype of fp32/bf16/fp16
    value = rng.choice([float("nan"), float("inf"), -float("inf"), 0.0, -3.0, 1e30, -1e39])
    case.args[slot] = value
    limit = torch.finfo(_acc(case.args[0].dtype)).max
    case.mutate(f"scaling={value}", "valid" if abs(value) <= limit else "invalid")


def set_temperature(case, slot, rng):
    value = rng.choice([float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 5e-324, 1e-45,
                        1e-300, 1e-30, 1e-3, 1e300])
    verdict = ("invalid" if not (0 < value < float("inf")) else
               "either" if value < 1e-30 else "valid")
    case.args[slot] = value
    case.mutate(f"temperature={value}", verdict)


def set_num_null(case, slot, rng):
    value = rng.choice([-1, -(2**63)] + list(HUGE_INTS))
    case.args[slot] = value
    case.mutate(f"num_null_experts={value}", "invalid" if value < 0 else "either")


# ---- the op families: valid inputs, then their own value mutations
def route_case(rng) -> Case:
    T, M = _size(rng, 12, (100, 300)), rng.randint(1, 10)
    K, dtype = rng.randint(1, M), rng.choice(FLOATS)
    tau = rng.choice([1.0, 0.5, 2.0])
    if rng.random() < 0.7:
        bias = _data(rng, M, dtype=rng.choice(FLOATS)) if rng.random() < 0.5 else None
        case = Case("route", [_data(rng, T, M, dtype=dtype), bias, K, tau, rng.random() < 0.5])
        value = [lambda: _route_logits(case, rng), lambda: set_temperature(case, 3, rng),
                 lambda: _route_top_k(case, rng)]
    else:
        acc = rng.choice([torch.float32, torch.float64])
        logits = _data(rng, T, M, dtype=acc)
        probs, w, e, _ = reference.route(logits, K, tau, None, True)
        gp = _data(rng, T, M, dtype=acc) if rng.random() < 0.7 else None
        case = Case("route_backward", [gp, _data(rng, T, K, dtype=acc), probs, w, e, tau, True])
        value = [lambda: set_bad_id(case, 4, rng, M), lambda: set_temperature(case, 5, rng)]
    return _finish(case, rng, value)


def _route_logits(case, rng):
    """Huge finite logits or bias must route without NaN; non-finite ones are refused."""
    slot = rng.choice([0, 1]) if case.args[1] is not None else 0
    t = case.args[slot].clone()
    if t.numel() == 0 or not t.is_floating_point() or t.device.type == "meta":
        return
    finite = rng.random() < 0.6
    # as large as the value's dtype and the routing dtype (float32 for low precision) allow
    big = min(torch.finfo(t.dtype).max, torch.finfo(_acc(case.args[0].dtype)).max
              if case.args[0].is_floating_point() else float("inf"))
    value = rng.choice([big, -big, big / 3]) if finite else rng.choice(
        [float("nan"), float("inf"), -float("inf")])
    t.view(-1)[rng.randrange(t.numel())] = value
    case.args[slot] = t
    case.mutate(f"{case.names[slot]}[.]={value:.3g}", "valid" if finite else "invalid")


def _route_top_k(case, rng):
    M = case.args[0].shape[-1]
    value = rng.choice([0, -1, M + 1, -(2**63)] + list(HUGE_INTS))
    case.args[2] = value
    case.mutate(f"top_k={value}", "invalid")


def align_case(rng) -> Case:
    T, K = _size(rng, 12, (2000, 5000)), rng.randint(1, 4)
    bins = rng.choice([rng.randint(1, 12), rng.randint(100, 5000)])
    case = Case("align", [torch.randint(0, bins, (T, K)), bins])

    def bins_value():
        value = rng.choice([0, -1, -(2**63), MAX_BINS + 1] + list(HUGE_INTS))
        case.args[1] = value
        case.mutate(f"num_bins={value}", "invalid")

    return _finish(case, rng, [lambda: set_bad_id(case, 0, rng, bins), bins_value])


def _lora_inputs(rng):
    """Valid inputs of both LoRA op families at small random shapes."""
    T, D, O = _size(rng, 10, (129, 300)), _size(rng, 9, (257, 300)), _size(rng, 9, (257, 300))
    E, R, N = rng.randint(1, 6), rng.randint(1, 5), rng.randint(0, 2)
    K, dtype, s = rng.randint(1, E + N), rng.choice(FLOATS), rng.uniform(-2, 2)
    x, A, B = (_data(rng, *shape, dtype=dtype) for shape in ((T, D), (E, R, D), (E, O, R)))
    w, e = _routing(rng, T, E + N, K)
    return T, O, E, N, dtype, s, x, A, B, w.to(_acc(dtype)), e


def lora_case(rng) -> Case:
    T, O, E, N, dtype, s, x, A, B, w, e = _lora_inputs(rng)
    if rng.random() < 0.4:
        case = Case("lora_forward", [x, A, B, w, e, s, N])
        value = [lambda: set_bad_id(case, 4, rng, E + N), lambda: set_scaling(case, 5, rng),
                 lambda: set_num_null(case, 6, rng)]
        return _finish(case, rng, value)
    h = lora_pair_rows(x, A, e).to(_acc(dtype))
    order, offsets = lora_align(e, E)
    case = Case("lora_backward", [_data(rng, T, O, dtype=dtype), x, A, B, w, e, order, offsets, h,
                                  s, N])
    value = [lambda: set_bad_id(case, 5, rng, E + N), lambda: set_scaling(case, 9, rng),
             lambda: set_num_null(case, 10, rng), lambda: _bad_order(case, rng, E),
             lambda: _bad_offsets(case, rng)]
    return _finish(case, rng, value)


def lora_pair_rows(x, A, experts):
    """h (P, R): A_e x_t for each pair's LoRA expert e, 0 for null (and bad) ids."""
    E, R, _ = A.shape
    lora = (experts >= 0) & (experts < E)
    idx = torch.where(lora, experts, torch.zeros_like(experts)).flatten()
    tok = torch.arange(experts.numel()) // max(experts.shape[1], 1)
    h = torch.einsum("prd,pd->pr", A.double()[idx], x.double()[tok])
    return h * lora.flatten()[:, None]


def lora_align(experts, E):
    """lora_backward's order and offsets (E + 2,): every null expert in bin E."""
    return reference.align(experts.clamp(max=E), E + 1)


def _bad_order(case, rng, E):
    order, experts = case.args[6].clone(), case.args[5]
    P = order.numel()
    if (P < 2 or order.dtype != torch.int64 or experts.numel() != P
            or "meta" in (order.device.type, experts.device.type)):
        return
    i, j = rng.sample(range(P), 2)
    how = rng.choice(["range", "duplicate", "swap"])
    if how == "range":
        order[i] = rng.choice([P, -1, 2**62, -(2**63)])
        verdict = "invalid"
    elif how == "duplicate":
        order[i] = order[j]
        verdict = "invalid"
    else:
        flat = experts.flatten().clamp(max=E)
        order[i], order[j] = order[j].clone(), order[i].clone()
        verdict = "either" if flat[order[i]] == flat[order[j]] else "invalid"
    case.args[6] = order
    case.mutate(f"order({how})", verdict)


def _bad_offsets(case, rng):
    offsets = case.args[7].clone()
    if offsets.numel() < 2 or offsets.dtype != torch.int64 or offsets.device.type == "meta":
        return
    i = rng.randrange(offsets.numel())
    offsets[i] = rng.choice([offsets[i] + 1, offsets[i] - 1, -1, 2**62, -(2**63), 2**63 - 1])
    verdict = "valid" if torch.equal(offsets, case.args[7]) else "invalid"
    case.args[7] = offsets
    case.mutate(f"offsets[{i}]", verdict)


def lora_dense_case(rng) -> Case:
    T, O, E, N, dtype, s, x, A, B, w, e = _lora_inputs(rng)
    h_all = (x.double() @ A.double().flatten(0, 1).T).to(dtype)  # (T, E*R)
    which = rng.random()
    if which < 0.3:
        case = Case("lora_dense_forward", [x, A, B, w, e, s, N])
    elif which < 0.6:
        case = Case("lora_dense_backward", [_data(rng, T, O, dtype=dtype), x, A, B, w, e, h_all, s, N])
    elif which < 0.8:
        case = Case("lora_dense_expand", [h_all, B, w, e, s, N])
    else:
        case = Case("lora_dense_expand_backward", [_data(rng, T, O, dtype=dtype), h_all, B, w, e, s, N])
    at = case.names.index
    value = [lambda: set_bad_id(case, at("experts"), rng, E + N),
             lambda: set_scaling(case, at("scaling"), rng),
             lambda: set_num_null(case, at("num_null_experts"), rng)]
    return _finish(case, rng, value)


def _finish(case, rng, value_mutations) -> Case:
    """Up to three mutations: generic ones (shape, dtype, layout, device) first, then
    value ones, each at most once, so that no mutation undoes another (a reshaping that
    drops a bad id, a second scaling over the first, a swap swapped back)."""
    n = rng.choice([0, 1, 1, 2, 2, 3])
    chosen = [rng.choice(GENERIC + tuple(value_mutations)) for _ in range(n)]
    for m in [m for m in chosen if m in GENERIC]:
        m(case, rng)
    for m in dict.fromkeys(m for m in chosen if m not in GENERIC):
        m()
    return case


MAKERS = {"route": route_case, "align": align_case, "lora": lora_case,
          "lora_dense": lora_dense_case}


def make_case(family: str, rng: random.Random) -> Case:
    return MAKERS[family](rng)
