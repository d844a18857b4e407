"""MoLoRAConfig and MoLoRALinear."""
import json

import pytest
import torch
from torch import nn

from moe_ext import MoLoRAConfig, MoLoRALinear, reference


def test_fresh_layer_equals_base():
    base = nn.Linear(12, 9)
    layer = MoLoRALinear(base, MoLoRAConfig(r=4, num_experts=3, top_k=2))
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(layer(x), base(x))
    assert layer.last_routing.probs.shape == (10, 3)
    assert layer.last_routing.experts.shape == (10, 2)
    assert int(layer.last_routing.counts.sum()) == 20


def test_layer_matches_reference_and_trains():
    torch.manual_seed(0)
    cfg = MoLoRAConfig(r=4, lora_alpha=8, num_experts=4, num_null_experts=1, top_k=2)
    layer = MoLoRALinear(nn.Linear(16, 8), cfg).double()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(40, 16, dtype=torch.float64)
    want = layer.base(x) + reference.molora(x, layer.router(x), layer.lora_A, layer.lora_B, 2,
                                            cfg.scaling, 1)
    torch.testing.assert_close(layer(x), want)
    # only LoRA and router train; a few steps lower a regression loss
    for p in layer.base.parameters():
        p.requires_grad_(False)
    target = torch.randn(40, 8, dtype=torch.float64)
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = (layer(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_logit_bias_steers_routing():
    layer = MoLoRALinear(nn.Linear(6, 6), MoLoRAConfig(r=2, num_experts=3, top_k=1))
    layer.logit_bias[1] = 100.0
    layer(torch.randn(30, 6))
    assert (layer.last_routing.experts == 1).all()


@pytest.mark.parametrize("field,value", [("r", 0), ("num_experts", 0), ("top_k", 5),
                                         ("lora_dropout", 1.0), ("router_temperature", 0.0),
                                         ("strategy", "fast"), ("num_null_experts", -1)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        MoLoRAConfig(**{"num_experts": 4, field: value})


def test_config_expert_groups_checked_and_json_round_trip():
    with pytest.raises(ValueError, match="expert_groups"):
        MoLoRAConfig(num_experts=2, expert_groups={"helpful": [0, 5]})
    cfg = MoLoRAConfig(num_experts=4, num_null_experts=1, expert_groups={"a": [0, 1], "b": [2, 3]})
    again = MoLoRAConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ValueError, match="unknown"):
        MoLoRAConfig.from_dict({"rank": 3})


def test_layer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="base must be"):
        MoLoRALinear(nn.Conv1d(3, 3, 1), MoLoRAConfig())
    with pytest.raises(ValueError, match="config"):
        MoLoRALinear(nn.Linear(3, 3), {"r": 2})


def _graph(out):
    """Every autograd node behind `out`, once."""
    seen, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and id(node) not in seen:
            seen.add(id(node))
            yield node
            todo += [n for n, _ in node.next_functions]


def _graph_nodes(out):
    return {type(node).__name__ for node in _graph(out)}


def _edges_into(out, leaf):
    """How many gradients autograd adds up for `leaf` (edges into its AccumulateGrad)."""
    return sum(getattr(n, "variable", None) is leaf for node in _graph(out)
               for n, _ in node.next_functions)


def _conv1d(D, O):
    from transformers.pytorch_utils import Conv1D
    return Conv1D(O, D)


@pytest.mark.parametrize("make_base", [lambda: nn.Linear(16, 8, bias=False), lambda: nn.Linear(16, 8),
                                       lambda: _conv1d(16, 8)], ids=["linear", "linear+bias", "conv1d"])
@pytest.mark.parametrize("strategy", ["sparse", "dense"])
def test_base_added_in_place_matches_separate_add(make_base, strategy, monkeypatch):
    """A plain Linear / Conv1D adds base(x) into the delta in one GEMM (beta = 1); a hooked
    base runs as a module. Both give the same output and gradients as base(x) + delta."""
    import moe_ext.molora.layer as layer_module
    calls = []
    fused = layer_module._add_base_in_place
    monkeypatch.setattr(layer_module, "_add_base_in_place",
                        lambda *a: calls.append(1) or fused(*a))
    torch.manual_seed(0)
    layer = MoLoRALinear(make_base(), MoLoRAConfig(r=4, num_experts=4, num_null_experts=1,
                                                   top_k=2, strategy=strategy)).double()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    params = [x] + [p for p in layer.parameters()]

    def out_and_grads():
        y = layer(x)
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, 8, dtype=y.dtype)).sum(), params)
        return y, grads

    y, grads = out_and_grads()
    assert calls == [1]
    nodes = _graph_nodes(y)  # in place on the kernel's tensor: no CopySlices
    assert "CopySlices" not in nodes and "_AddBaseInPlaceBackward" in nodes
    # one dx for the router's and the base's GEMMs (shared_x); the sparse experts add theirs,
    # the dense ones are in the router's GEMM: 2 or 1 gradients to add up for x, not 3
    assert _edges_into(y, x) == (2 if strategy == "sparse" else 1)
    want = layer.base(x) + layer.molora_output(x).delta
    torch.testing.assert_close(y, want)
    hook_calls = []
    handle = layer.base.register_forward_hook(lambda m, i, o: hook_calls.append(1))
    y2, grads2 = out_and_grads()
    handle.remove()
    assert calls == [1] and hook_calls == [1]  # the hooked base ran as a module
    assert layer(torch.zeros(2, 0, 16, dtype=torch.float64)).shape == (2, 0, 8)  # no tokens
    torch.testing.assert_close(y, y2)
    for g, g2 in zip(grads, grads2):
        torch.testing.assert_close(g, g2)


@pytest.mark.parametrize("num_null", [0, 2])
def test_dense_router_logits_come_from_the_shrink_gemm(num_null, monkeypatch):
    """Dense strategy: the router logits and every expert's shrink are one GEMM over x
    (x read once), then lora_dense_expand; outputs, routing and every gradient (x, lora_A,
    lora_B, router, base) equal the unfused layer's (a hooked router runs as a module)."""
    import moe_ext.molora.layer as layer_module
    calls = []
    weight = layer_module.shrink_router_weight
    monkeypatch.setattr(layer_module, "shrink_router_weight", lambda *a: calls.append(1) or weight(*a))
    torch.manual_seed(0)
    cfg = MoLoRAConfig(r=4, num_experts=4, num_null_experts=num_null, top_k=2, strategy="dense")
    layer = MoLoRALinear(nn.Linear(16, 8), cfg).double()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    params = [x] + list(layer.parameters())
    g = torch.randn(3, 7, 8, dtype=torch.float64)

    def run():
        y = layer(x)
        return y, layer.last_routing, torch.autograd.grad((y * g).sum(), params)

    y, routing, grads = run()
    assert calls == [1] and {"SplitWithSizesBackward0", "_ProjectBackward"} <= _graph_nodes(y)
    assert _edges_into(y, x) == 1  # one GEMM gives dx for the base, the router and the experts
    routed = []
    handle = layer.router.register_forward_hook(lambda m, i, o: routed.append(1))
    y2, routing2, grads2 = run()
    handle.remove()
    assert calls == [1] and routed == [1]  # the hooked router ran as a module, unfused
    torch.testing.assert_close(y, y2)
    assert torch.equal(routing.experts, routing2.experts)
    torch.testing.assert_close(routing.logits, routing2.logits)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b)
    want = layer.base(x) + reference.molora(x, layer.router(x), layer.lora_A, layer.lora_B, 2,
                                            cfg.scaling, num_null)
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(layer.molora_output(x).delta, want - layer.base(x))
    assert calls == [1, 1] and layer.molora_output(x).delta.shape == (3, 7, 8)
    assert layer(torch.zeros(2, 0, 16, dtype=torch.float64)).shape == (2, 0, 8)  # no tokens


def test_router_fusion_only_where_it_is_exact():
    """Unfused: sparse strategy, dropout while training (the router sees x, the experts
    dropout(x)), a router with a bias or hooks, a router of another dtype."""
    def layer(**kw):
        cfg = dict(r=2, num_experts=3, top_k=2, strategy="dense") | kw
        return MoLoRALinear(nn.Linear(6, 5), MoLoRAConfig(**cfg))
    x = torch.randn(4, 6)
    assert layer()._router_fuses(x)
    dropped = layer(lora_dropout=0.1)
    assert not dropped._router_fuses(x) and dropped.eval()._router_fuses(x)
    biased = layer()
    biased.router = nn.Linear(6, 3)
    assert not biased._router_fuses(x)
    other = layer()
    other.router.double()
    assert not other._router_fuses(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert other._router_fuses(x)
        y = other(x)  # the experts and the router run in the autocast dtype
    assert y.shape == (4, 5) and other.last_routing.logits.dtype == torch.bfloat16


def test_router_fusion_with_row_bias_override():
    """routing_override's per-row bias is added to the fused GEMM's logits, per batch row."""
    from moe_ext.molora.layer import routing_override
    torch.manual_seed(1)
    layer = MoLoRALinear(nn.Linear(8, 8), MoLoRAConfig(r=2, num_experts=3, top_k=1,
                                                       strategy="dense"))
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 8)
    bias = torch.tensor([[100.0, 0, 0], [0, 0, 100.0]])
    with routing_override(bias):
        y = layer(x)
    assert (layer.last_routing.experts.view(2, 5) == torch.tensor([[0], [2]])).all()
    hooked = layer.router.register_forward_hook(lambda m, i, o: None)
    with routing_override(bias):
        torch.testing.assert_close(layer(x), y)
    hooked.remove()
