"""Router losses in a MoLoRA model's output, as transformers' MoE models (Mixtral, Qwen-MoE)
return them, so that HF Trainer, TRL's trainers and any loop that reads `aux_loss` train
the routers.

get_molora_model installs two hooks on the top-level model:
- before forward: pops the `output_router_logits` keyword (default: the config's
  `output_router_logits`, set to True at injection) and `preference` ((B,) index into
  `expert_groups`, -1 unlabelled; broadcast over rows when the batch stacks several
  sequences per example, e.g. TRL's chosen then rejected), and forgets the last routing;
- after forward: when asked and a MoLoRA layer routed in this forward (not under
  disable_adapters), sets `output.aux_loss` = router_aux_loss_coef * load balance +
  router_z_loss_coef * z-loss + group_loss_coef * group loss (MoLoRAConfig's
  coefficients; the group loss only with `preference`), and, when the output has a `loss`
  (labels were given), adds `config.router_aux_loss_coef * aux_loss` to it as Mixtral
  does. `config.router_aux_loss_coef` is 1.0 at injection (unless the base already has
  one): it is the multiplier TRL and Trainer put on aux_loss, so setting it (or TRL's
  `router_aux_loss_coef`) scales all router losses together.

The config's `output_router_logits` is hidden (False) while the wrapped forward runs, so
that code reading it for a native MoE (TRL's fused LM head) leaves a dense base alone.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from .losses import router_losses
from .layer import molora_layers


def _rows(kwargs: dict, args: tuple) -> Optional[int]:
    for key in ("input_ids", "inputs_embeds", "attention_mask"):
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    return args[0].shape[0] if args and isinstance(args[0], torch.Tensor) else None


def _pre_hook(model: nn.Module, args: tuple, kwargs: dict):
    config = getattr(model, "config", None)
    want = kwargs.pop("output_router_logits", None)
    if want is None:
        want = bool(getattr(config, "output_router_logits", True))
    preference = kwargs.pop("preference", None)
    for layer in molora_layers(model).values():
        layer.last_routing = None
    hidden = None
    if config is not None and getattr(config, "output_router_logits", None) is not None:
        hidden = config.output_router_logits
        config.output_router_logits = False
    model._molora_calls.append((want, preference, hidden, _rows(kwargs, args),
                                kwargs.get("attention_mask")))
    return args, kwargs


def _post_hook(model: nn.Module, args: tuple, kwargs: dict, output):
    want, preference, hidden, rows, mask = model._molora_calls.pop()
    config = getattr(model, "config", None)
    if hidden is not None:
        config.output_router_logits = hidden
    if output is None or not want or not hasattr(output, "keys") or torch.compiler.is_exporting():
        return output  # an exported graph (ONNX) serves inference: no losses in it
    routed = [m for m in molora_layers(model).values() if m.last_routing is not None]
    if not routed:
        return output
    tokens = routed[0].last_routing.probs.shape[0]
    if not (isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.numel() == tokens):
        mask = None  # e.g. generation with a cache: the mask covers past tokens too
    if preference is not None:
        preference = torch.as_tensor(preference).reshape(-1)
        if rows is None or rows % preference.shape[0] or tokens % rows:
            raise ValueError(f"preference has {preference.shape[0]} rows, which does not divide "
                             f"the batch of {rows} sequences")
        preference = preference.repeat(rows // preference.shape[0])
    aux = router_losses(model, preference, mask)["total"]
    if output.get("aux_loss") is not None:
        aux = output["aux_loss"] + aux
    output["aux_loss"] = aux
    if output.get("loss") is not None:
        output["loss"] = output["loss"] + float(getattr(config, "router_aux_loss_coef", 1.0)) * aux
    return output


@contextlib.contextmanager
def router_flag_hidden(model: nn.Module):
    """model.config.output_router_logits reads False inside the block (see the module
    docstring); for forwards that bypass the model's own hooks (TRL's patched forwards)."""
    config = getattr(model, "config", None)
    before = getattr(config, "output_router_logits", None)
    if before is not None:
        config.output_router_logits = False
    try:
        yield
    finally:
        if before is not None:
            config.output_router_logits = before


def install_router_outputs(model: nn.Module) -> None:
    """Adds the hooks above to `model` (once) and, on a transformers config that lacks
    them, output_router_logits = True and router_aux_loss_coef = 1.0."""
    if getattr(model, "_molora_calls", None) is not None:
        return
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        if getattr(config, "output_router_logits", None) is None:
            config.output_router_logits = True
        if getattr(config, "router_aux_loss_coef", None) is None:
            config.router_aux_loss_coef = 1.0
    model._molora_calls = []
    model.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    model.register_forward_hook(_post_hook, with_kwargs=True, always_call=True)
