"""Run under torchrun (2 CPU ranks, gloo) by test_zero3.py: a MoLoRA causal LM (dense
strategy: ZeRO-3's module hooks make the router run as a module) trains under DeepSpeed
ZeRO-3 with bf16 autocast, every parameter partitioned; save_molora from every rank, then
load_molora into a fresh ZeRO-3 model (every rank) and an unsharded one (rank 0). Every
rank writes the gathered tensors (rank 0 also the reloaded ones) to rank<r>.safetensors."""
import logging
import os
import sys

import torch
from safetensors.torch import save_file

import moe_ext
from moe_ext import pmol
from moe_ext.molora import adapter_parameters, adapter_state_dict
from moe_ext.utils.distributed import full_tensors

logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
import deepspeed  # noqa: E402

out = sys.argv[1]
torch.set_num_threads(1)
deepspeed.init_distributed(dist_backend="gloo")
rank = torch.distributed.get_rank()
tok = pmol.synthetic_tokenizer()
CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "torch_autocast": {"enabled": True, "dtype": "bfloat16"},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}


def engine(seed):
    cfg = pmol.pmol_config(list(pmol.SYNTHETIC_PREFERENCES), r=2, target_modules=["q_proj", "v_proj"])
    cfg.strategy = "dense"
    model = moe_ext.get_molora_model(pmol.build_tiny_causal_lm(len(tok), hidden=32, seed=seed), cfg)
    trained = [p for p in model.parameters() if p.requires_grad]
    return deepspeed.initialize(model=model, model_parameters=trained, config=CONFIG)[0], model


report = {}
ds, model = engine(0)
assert all(p.numel() == 0 for p in adapter_parameters(model).values())  # partitioned
ids = torch.randint(0, len(tok), (2, 8), generator=torch.Generator().manual_seed(rank))
for _ in range(2):
    out_ = ds(input_ids=ids, labels=ids)
    ds.backward(out_.loss)
    ds.step()
report["aux_loss"] = out_.aux_loss.detach().float().reshape(1)
moe_ext.save_molora(model, os.path.join(out, "adapter"))
report.update({f"trained.{k}": v for k, v in full_tensors(adapter_parameters(model)).items()})

_, other = engine(1)
moe_ext.load_molora(other, os.path.join(out, "adapter"))
report.update({f"zero3_load.{k}": v for k, v in full_tensors(adapter_parameters(other)).items()})
if rank == 0:
    fresh = moe_ext.get_molora_model(pmol.build_tiny_causal_lm(len(tok), hidden=32, seed=2),
                                     other.molora_config)
    moe_ext.load_molora(fresh, os.path.join(out, "adapter"))
    report.update({f"plain_load.{k}": v for k, v in adapter_state_dict(fresh).items()})
save_file({k: v.contiguous() for k, v in report.items()}, os.path.join(out, f"rank{rank}.safetensors"))
torch.distributed.destroy_process_group()
