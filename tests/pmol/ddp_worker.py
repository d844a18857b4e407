"""Run under torchrun by test_pmol.py: a few PMoL steps with DDP on gloo; every rank writes
a checksum of its trainable parameters so the test can check they agree."""
import json
import os
import sys

import torch

import moe_ext
from moe_ext import pmol
from moe_ext.training import TrainConfig

out = sys.argv[1]
torch.set_num_threads(1)
tok = pmol.synthetic_tokenizer()
model = moe_ext.get_molora_model(pmol.build_tiny_causal_lm(len(tok), hidden=32, seed=0),
                                 pmol.pmol_config(list(pmol.SYNTHETIC_PREFERENCES), r=2,
                                                  target_modules=["q_proj", "v_proj"]))
result = pmol.train_pmol(model, pmol.synthetic_preference_data(20), tok,
                         TrainConfig(steps=3, progress=False), batch_size=4)
rank = torch.distributed.get_rank()
checksum = sum(p.double().sum().item() for p in model.parameters() if p.requires_grad)
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"checksum": checksum, "world": torch.distributed.get_world_size(),
               "steps": len(result.history)}, f)
torch.distributed.destroy_process_group()
