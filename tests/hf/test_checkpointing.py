"""Gradient checkpointing and the router losses: non-reentrant checkpointing keeps their
gradients exactly; reentrant checkpointing (use_reentrant=True) cannot (its forward runs
under no_grad, so aux_loss comes from a routing without graph) and says so once
(RouterLossGradientWarning) instead of silently training the routers without them."""
import warnings

import pytest
import torch

pytest.importorskip("transformers")

import moe_ext  # noqa: E402
from moe_ext import pmol  # noqa: E402
from moe_ext.molora.losses import RouterLossGradientWarning  # noqa: E402


def model_and_ids():
    tok = pmol.synthetic_tokenizer()
    model = moe_ext.get_molora_model(
        pmol.build_tiny_causal_lm(len(tok), hidden=32, seed=0),
        pmol.pmol_config(list(pmol.SYNTHETIC_PREFERENCES), r=2, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, len(tok), (2, 10), generator=torch.Generator().manual_seed(0))
    return model.train(), ids


def router_grads_of_aux(model, ids):
    model.zero_grad()
    out = model(input_ids=ids)
    if out.aux_loss.requires_grad:
        out.aux_loss.backward()
    return out.aux_loss, {n: (p.grad.clone() if p.grad is not None else None)
                          for n, p in model.named_parameters() if n.endswith("router.weight")}


def checkpointed(reentrant):
    model, ids = model_and_ids()
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()  # reentrant checkpoints need an input that requires grad
    return model, ids


def test_non_reentrant_checkpointing_keeps_router_loss_gradients():
    model, ids = model_and_ids()
    want_aux, want = router_grads_of_aux(model, ids)
    model, ids = checkpointed(reentrant=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RouterLossGradientWarning)
        aux, got = router_grads_of_aux(model, ids)
    assert aux.requires_grad and torch.equal(aux, want_aux)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-8)


def test_reentrant_checkpointing_warns_that_router_losses_train_nothing():
    model, ids = checkpointed(reentrant=True)
    with pytest.warns(RouterLossGradientWarning, match="use_reentrant.*False"):
        aux, grads = router_grads_of_aux(model, ids)
    assert not aux.requires_grad and all(g is None for g in grads.values())
    with warnings.catch_warnings():  # once per model
        warnings.simplefilter("error", RouterLossGradientWarning)
        model(input_ids=ids)


def test_no_warning_without_gradients():
    model, ids = checkpointed(reentrant=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RouterLossGradientWarning)
        with torch.no_grad():
            model(input_ids=ids)
        model.eval()
        model(input_ids=ids)  # eval: no checkpointing, the routing has its graph
