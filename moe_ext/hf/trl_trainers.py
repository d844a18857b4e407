"""TRL's DPOTrainer and RewardTrainer for MoLoRA models (needs `trl`).

- MoLoRADPOTrainer: the reference policy is the same model with its adapters off
  (AdaptersOffReference: no second copy in memory; TRL would otherwise load another
  copy of the base for a non-PEFT model); the router losses come in through TRL's own
  MoE path (`output_router_logits`, `aux_loss` x router_aux_loss_coef); a `preference`
  column feeds PMoL's group loss.
- MoLoRARewardTrainer: RewardTrainer plus the router losses (RewardTrainer does not add
  `aux_loss`) and the `preference` column; the reward head of a sequence-classification
  model is trained and saved with the adapter (modules_to_save).

Both save adapter-only checkpoints that resume (MoLoRATrainerMixin).

Training a steerable model (MoLoRAConfig.steerable) over preference mixes, as
moe_ext.pmol.train_pmol does with DPOConfig.mix_alpha: pass `mix_alpha` (and
`mix_none_prob`) to MoLoRADPOTrainer. Each pair of a batch draws its own mix
lambda ~ Dirichlet(mix_alpha) over the expert groups (or none, for a share mix_none_prob
of the pairs), seeded by (args.seed, global step, micro-batch, rank) as train_pmol's; the
policy's routers see it, and the loss is moe_ext.pmol.dpo.mix_loss's with TRL's beta and
label_smoothing (applied as conservative DPO, as moe_ext.pmol does): per group g the DPO
loss over the pair's margin signed by its label for g, weighted by lambda_g |label| (pairs
without a mix: ordinary DPO; the two parts count equally), plus the router losses (the
group loss on every pair's prompt routing). Labels per group
come from a `preference_labels` column ({group: 1, -1 or 0} or its JSON string; a row
without one has +1 at its own `preference`). TRL 1.16 has no rpo_alpha: its RPO is
loss_type=["sigmoid", "sft"] with loss_weights=[1, rpo_alpha], which here puts the same
weights on the NLL per token of the response each group prefers. Logged besides TRL's
metrics: mix/mixed (share of pairs with a mix), mix/accuracies (share of the taught
(pair, group) margins of the right sign) and, with RPO, mix/nll. Gradient checkpointing
(TRL's default) needs use_reentrant=False: the recomputation is given the same mix.

    model = moe_ext.get_molora_model(base, pmol.pmol_config(groups, steerable=True))
    trainer = MoLoRADPOTrainer(model, args=trl.DPOConfig(output_dir="out", beta=0.1),
                               train_dataset=rows, processing_class=tokenizer,
                               mix_alpha=0.25, mix_none_prob=0.25)
    trainer.train()
    with moe_ext.molora.preference_mix(model, {"concise": 0.7, "safe": 0.3}):
        model.generate(...)
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Iterator, Optional

import torch
from torch import nn
from trl import DPOTrainer, RewardTrainer

from ..molora import disable_adapters, is_steerable
from ..molora.layer import mix_override
from ..molora.outputs import router_flag_hidden
from ..pmol.dpo import mix_dpo_loss
from ..pmol.train import with_sampled_mixes
from .collator import PREFERENCE, PREFERENCE_LABELS
from .trainer import MoLoRATrainerMixin, quantized_base_accepted


class AdaptersOffReference(nn.Module):
    """The reference model of DPO as a view of the policy with its adapters off: calls run
    the policy's own modules under disable_adapters and no_grad. The policy is not a
    submodule (its parameters are not counted twice, .eval() / .to() leave it alone)."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        object.__setattr__(self, "policy", policy)

    @property
    def config(self):
        return self.policy.config

    @property
    def base_model(self):
        return self.policy.base_model

    def get_output_embeddings(self):
        return self.policy.get_output_embeddings()

    def forward(self, *args, **kwargs):
        return self.policy(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        kwargs.pop("preference", None)
        kwargs.pop("output_router_logits", None)
        with torch.no_grad(), disable_adapters(self.policy), router_flag_hidden(self.policy):
            return super().__call__(*args, **kwargs)


class MoLoRADPOTrainer(MoLoRATrainerMixin, DPOTrainer):
    """DPOTrainer(model, ...) for a MoLoRA model (pass the model object, not a name); other
    arguments as DPOTrainer's. Without ref_model the reference is the model with adapters
    off.

    mix_alpha: train a steerable model over sampled preference mixes (module docstring),
    lambda ~ Dirichlet(mix_alpha) per pair; None (default): no mixes, plain TRL DPO.
    mix_none_prob: share of the pairs that draw no mix (their prompt routes them)."""

    _kept_columns = (PREFERENCE, PREFERENCE_LABELS)

    def __init__(self, model: nn.Module, ref_model=None, *args, mix_alpha: Optional[float] = None,
                 mix_none_prob: float = 0.25, **kwargs):
        if not isinstance(model, nn.Module) or not hasattr(model, "molora_config"):
            raise ValueError("MoLoRADPOTrainer needs a model with MoLoRA layers "
                             "(moe_ext.get_molora_model or load_molora)")
        _check_mix_arguments(model, mix_alpha, mix_none_prob)
        self.mix_alpha, self.mix_none_prob = mix_alpha, mix_none_prob
        self._mix_key, self._mix_draws = None, 0
        with quantized_base_accepted(model):
            super().__init__(model, AdaptersOffReference(model) if ref_model is None else ref_model,
                             *args, **kwargs)
        self._wrap_preference_collator(multi_labels=mix_alpha is not None)
        if mix_alpha is not None:
            self._dpo_weight, self._rpo_alpha = _mix_loss_weights(self.args)

    def batch_mixes(self, batch_size: int, step: int, micro: int) -> torch.Tensor:
        """(batch_size, G) float32 mixes of micro-batch `micro` of step `step` on this rank:
        Dirichlet(mix_alpha) rows, rows of zeros (no mix) for a share mix_none_prob; the
        draws of moe_ext.pmol.train_pmol for the same (seed, step, micro, rank)."""
        groups = len(self.model.molora_config.expert_groups)
        draw = with_sampled_mixes(lambda *_: {"labels": torch.empty(batch_size, 0)}, groups,
                                  self.mix_alpha, self.mix_none_prob, self.args.seed)
        return draw(step, micro, self.accelerator.process_index, self.accelerator.num_processes)["mix"]

    def _next_mixes(self, batch_size: int) -> torch.Tensor:
        """This micro-batch's mixes: counted from 0 at each global step (so a resumed run
        draws the same ones); evaluation batches count down from -1 (a stream of their own)."""
        key = (self.model.training, self.state.global_step)
        if key != self._mix_key:
            self._mix_key, self._mix_draws = key, 0
        micro = self._mix_draws if self.model.training else -1 - self._mix_draws
        self._mix_draws += 1
        return self.batch_mixes(batch_size, self.state.global_step, micro)

    def evaluate(self, *args, **kwargs):
        self._mix_key = None  # every evaluation draws the same mixes at a given step
        return super().evaluate(*args, **kwargs)

    def _compute_loss(self, model, inputs, return_outputs):
        inputs = dict(inputs)
        labels = inputs.pop(PREFERENCE_LABELS, None)  # not a model input
        if self.mix_alpha is None:
            return super()._compute_loss(model, inputs, return_outputs)
        if labels is None:
            raise ValueError("MoLoRADPOTrainer(mix_alpha=...) needs a `preference` or "
                             "`preference_labels` column: the mix weighs each pair by its labels")
        mode = "train" if self.model.training else "eval"
        B = inputs["input_ids"].shape[0] // 2
        lam = self._next_mixes(B).to(inputs["input_ids"].device)       # (B, G)
        # TRL runs the forwards (fused LM head) and logs its metrics; its DPO loss is replaced
        # by the mix loss on the same log-probs
        rows = lam.repeat(2, 1)                                          # (2B, G): chosen, rejected
        with mix_override(rows), _mix_in_recomputation(model, rows), _first_output(model) as policy, \
                _first_output(self.ref_model) as reference:
            result = super()._compute_loss(model, inputs, return_outputs)
        mask = inputs["completion_mask"]
        logps = policy[0].log_probs[:, -(mask.shape[1] - 1):].sum(1)           # (2B,)
        if self.precompute_ref_logps:
            ref = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
        else:
            ref = reference[0].log_probs[:, -(mask.shape[1] - 1):].sum(1)
        loss, parts = mix_dpo_loss(logps, ref, lam, labels, mask, self.beta,
                                   self.args.label_smoothing, self._rpo_alpha)
        loss = self._dpo_weight * loss
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * policy[0].aux_loss
        for name, key in (("mixed", "mixed"), ("accuracies", "dpo_acc"), ("nll", "nll")):
            if key in parts:
                value = torch.tensor(parts[key], device=lam.device)
                self._metrics[mode][f"mix/{name}"].append(
                    self.accelerator.gather_for_metrics(value).mean().item())
        return (loss, result[1]) if return_outputs else loss


def _check_mix_arguments(model: nn.Module, mix_alpha, mix_none_prob) -> None:
    if mix_alpha is None:
        return
    if isinstance(mix_alpha, bool) or not isinstance(mix_alpha, (int, float)) \
            or not 0 < mix_alpha < math.inf:
        raise ValueError(f"MoLoRADPOTrainer mix_alpha must be a finite number > 0 or None, got "
                         f"{mix_alpha!r}")
    if isinstance(mix_none_prob, bool) or not isinstance(mix_none_prob, (int, float)) \
            or not 0.0 <= mix_none_prob < 1.0:
        raise ValueError(f"MoLoRADPOTrainer mix_none_prob must be in [0, 1), got {mix_none_prob!r}")
    if not is_steerable(model):
        raise ValueError("MoLoRADPOTrainer mix_alpha needs a steerable model (MoLoRAConfig."
                         "steerable = True): its routers must see the mix")


def _mix_loss_weights(args) -> tuple[float, float]:
    """(weight of the mix loss, its rpo_alpha) from TRL's args: loss_type ["sigmoid"] or
    ["sigmoid", "sft"] with loss_weights [a, b] give a * (DPO + b / a * NLL); ValueError
    naming the option that the mix loss cannot honour."""
    types = list(args.loss_type)
    if "sigmoid" not in types or not set(types) <= {"sigmoid", "sft"} or len(set(types)) != len(types):
        raise ValueError(f"MoLoRADPOTrainer mix_alpha trains the sigmoid DPO loss (plus 'sft' for "
                         f"RPO): DPOConfig.loss_type must be ['sigmoid'] or ['sigmoid', 'sft'], "
                         f"got {types}")
    weights = dict(zip(types, args.loss_weights or [1.0] * len(types)))
    if not weights["sigmoid"] > 0 or weights.get("sft", 0.0) < 0:
        raise ValueError(f"MoLoRADPOTrainer mix_alpha: DPOConfig.loss_weights must be > 0 for "
                         f"'sigmoid' and >= 0 for 'sft', got {args.loss_weights}")
    if not 0.0 <= args.label_smoothing < 0.5:
        raise ValueError(f"MoLoRADPOTrainer mix_alpha: DPOConfig.label_smoothing must be in "
                         f"[0, 0.5), got {args.label_smoothing}")
    for option, plain in (("f_divergence_type", "reverse_kl"), ("ld_alpha", None),
                          ("use_weighting", False)):
        if getattr(args, option) != plain:
            raise ValueError(f"MoLoRADPOTrainer mix_alpha: DPOConfig.{option} must be {plain!r} "
                             f"(the mix loss is plain sigmoid DPO), got {getattr(args, option)!r}")
    return weights["sigmoid"], weights.get("sft", 0.0) / weights["sigmoid"]


@contextlib.contextmanager
def _mix_in_recomputation(model: nn.Module, rows: torch.Tensor) -> Iterator[None]:
    """Gradient checkpointing (TRL's default) recomputes the checkpointed layers during the
    backward, after the mix_override block has closed, and on GPU on autograd's worker
    thread, which does not see its ContextVar: inside this block the layers' checkpoint
    functions re-enter mix_override(rows) for the recomputation (torch.utils.checkpoint's
    context_fn; use_reentrant=False, transformers' default)."""
    def contexts():
        return contextlib.nullcontext(), mix_override(rows)

    swapped = [(m, m._gradient_checkpointing_func) for m in model.modules()
               if getattr(m, "gradient_checkpointing", False)
               and getattr(m, "_gradient_checkpointing_func", None) is not None]
    for _, fn in swapped:
        keywords = getattr(fn, "keywords", {})
        if keywords.get("use_reentrant", False) or "context_fn" in keywords:
            raise ValueError("MoLoRADPOTrainer mix_alpha with gradient checkpointing needs "
                             "DPOConfig.activation_checkpointing_kwargs (gradient_checkpointing_"
                             "kwargs) {'use_reentrant': False} without a context_fn (the mix is "
                             f"carried by one), got {keywords}")
    for module, fn in swapped:
        module._gradient_checkpointing_func = functools.partial(fn, context_fn=contexts)
    try:
        yield
    finally:
        for module, fn in swapped:
            module._gradient_checkpointing_func = fn


@contextlib.contextmanager
def _first_output(module: Optional[nn.Module]) -> Iterator[list]:
    """Inside the block, the list holds the output of module's first forward (none for
    module None): the log-probs TRL's _compute_loss computes but does not return."""
    seen: list = []
    if module is None:
        yield seen
        return
    handle = module.register_forward_hook(lambda m, args, out: seen.append(out) if not seen else None)
    try:
        yield seen
    finally:
        handle.remove()


class MoLoRARewardTrainer(MoLoRATrainerMixin, RewardTrainer):
    """RewardTrainer for a MoLoRA sequence-classification model: the Bradley-Terry loss
    plus config.router_aux_loss_coef x the model's `aux_loss` (logged as aux_loss)."""

    def __init__(self, model=None, *args, **kwargs):
        with quantized_base_accepted(model):
            super().__init__(model, *args, **kwargs)
        self._wrap_preference_collator()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {**inputs, "output_router_logits": True}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        aux = outputs.get("aux_loss") if hasattr(outputs, "get") else None
        if aux is not None:
            coef = float(getattr(self.model.config, "router_aux_loss_coef", 1.0))
            loss = loss + coef * aux
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["aux_loss"].append(float(aux.detach()))
        return (loss, outputs) if return_outputs else loss
