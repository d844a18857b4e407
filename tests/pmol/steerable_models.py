"""The tiny steerable PMoL model and batches that the steerable tests share."""
import torch

import moe_ext
from moe_ext import pmol
from moe_ext.molora import molora_layers

GROUPS = list(pmol.MIXING_PREFERENCES)


def steerable_model(seed=0, steerable=True, aux=0.01):
    tok = pmol.mixing_tokenizer()
    cfg = pmol.pmol_config(GROUPS, experts_per_group=1, num_null_experts=1, r=2, lora_alpha=4,
                           top_k=2, target_modules="all-linear", steerable=steerable,
                           router_aux_loss_coef=aux)
    torch.manual_seed(seed)
    model = moe_ext.get_molora_model(pmol.build_tiny_causal_lm(len(tok), hidden=32, seed=seed), cfg)
    with torch.no_grad():  # experts that change the output, so routing shows in the logits
        for layer in molora_layers(model).values():
            layer.lora_B.normal_(std=0.5)
    return model, tok


def mix_batch(examples, tok, mix=None):
    batch = pmol.collate_dpo(examples, tok, GROUPS)
    if mix is not None:
        batch["mix"] = mix
    return batch


@torch.no_grad()
def policy_and_reference(model, batch, mix):
    """(policy, reference) (2B,) sequence log-probs of a collated batch, the policy under the
    mix rows (B, G) (chosen and rejected alike), computed here apart from mix_loss."""
    def logps():
        return pmol.sequence_logps(model(input_ids=batch["input_ids"],
                                         attention_mask=batch["attention_mask"]).logits,
                                   batch["input_ids"], batch["response_mask"])

    with moe_ext.molora.layer.mix_override(mix.repeat(2, 1)):
        policy = logps()
    with moe_ext.disable_adapters(model):
        return policy, logps()
