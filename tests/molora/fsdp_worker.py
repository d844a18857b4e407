"""Run under torchrun (2 CPU ranks, gloo) by test_fsdp.py: a MoLoRA causal LM and reward
models sharded with FSDP2's fully_shard train a step, save from every rank (save_molora,
save_pretrained with is_main_process on rank 0 only, save_reward_model), and reload: rank 0
reads the files back; every rank writes the gathered tensors (and rank 0 the reloaded
ones) to rank<r>.safetensors for the test to compare."""
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard

import moe_ext
from moe_ext import pmol
from moe_ext.molora import adapter_state_dict
from moe_ext.reward import (BackboneRewardModel, RewardConfig, SparseMoERewardModel,
                            load_reward_model, save_reward_model)
from moe_ext.utils.distributed import full_tensors

out = sys.argv[1]
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
report = {}


def lm(seed=0, body_only=False):
    """A tiny Llama causal LM (or its LlamaModel body, a reward backbone) with MoLoRA layers."""
    tok = pmol.synthetic_tokenizer()
    base = pmol.build_tiny_causal_lm(len(tok), hidden=32, seed=seed)
    model = moe_ext.get_molora_model(
        base.model if body_only else base,
        pmol.pmol_config(list(pmol.SYNTHETIC_PREFERENCES), r=2,
                         target_modules=["q_proj", "v_proj", "up_proj"]))
    return model, len(tok)


def shard(model, blocks):
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def train_step(model, loss_fn):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss_fn(model).backward()
        opt.step()
        opt.zero_grad()


# --- a MoLoRA causal LM
model, vocab = lm()
shard(model, model.model.layers)
assert any(type(p).__name__ == "DTensor" for p in model.parameters())
ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(rank))
train_step(model, lambda m: m(input_ids=ids, labels=ids).loss)
moe_ext.save_molora(model, os.path.join(out, "save_molora"))
model.save_pretrained(os.path.join(out, "save_pretrained"), is_main_process=rank == 0)
trained = full_tensors(adapter_state_dict(model))  # every rank gathers; all see the same
report.update({f"trained.{k}": v for k, v in trained.items()})

sharded, _ = lm(seed=1)  # another init: the load must overwrite it
shard(sharded, sharded.model.layers)
moe_ext.load_molora(sharded, os.path.join(out, "save_molora"))
report.update({f"sharded_load.{k}": v for k, v in full_tensors(adapter_state_dict(sharded)).items()})

# --- reward models: embedding mode and backbone mode
reward = SparseMoERewardModel.from_config(RewardConfig(prompt_dim=8, response_dim=6, num_experts=4,
                                                       top_k=2, expert_hidden=5))
shard(reward, [])
g = torch.Generator().manual_seed(10 + rank)
prompts, responses = torch.randn(6, 8, generator=g), torch.randn(6, 6, generator=g)
train_step(reward, lambda m: m(prompts, responses).square().mean())
save_reward_model(reward, os.path.join(out, "reward"))
report.update({f"reward.{k}": v for k, v in full_tensors(reward.state_dict()).items()})

torch.manual_seed(3)
backbone, _ = lm(seed=2, body_only=True)
net = BackboneRewardModel(backbone, num_experts=2, pooling="last",
                          tokenizer=pmol.synthetic_tokenizer())
shard(net, net.backbone.layers)
mask = torch.ones_like(ids)
train_step(net, lambda m: m(ids[:, :4], mask[:, :4], ids, mask).square().mean())
save_reward_model(net, os.path.join(out, "backbone_reward"))
report.update({f"backbone_reward.{k}": v for k, v in full_tensors(net.state_dict()).items()})

if rank == 0:  # the files are written: every rank passed the savers' barrier
    for name in ("save_molora", "save_pretrained"):
        fresh, _ = lm(seed=3)
        moe_ext.load_molora(fresh, os.path.join(out, name))
        report.update({f"{name}.{k}": v for k, v in adapter_state_dict(fresh).items()})
    for name in ("reward", "backbone_reward"):
        loaded = load_reward_model(os.path.join(out, name))
        report.update({f"{name}_loaded.{k}": v for k, v in loaded.state_dict().items()})
save_file({k: v.contiguous() for k, v in report.items()}, os.path.join(out, f"rank{rank}.safetensors"))
dist.destroy_process_group()
