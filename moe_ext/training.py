"""A small, complete training loop shared by PMoL and reward-model training: AdamW over the
trainable parameters, gradient accumulation, progress bar, bf16 autocast on GPU, atomic
checkpoints that resume with identical results, and DDP under torchrun.

The caller gives two functions:
  batch_fn(step, micro, rank, world) -> batch   (deterministic in its arguments, so a
                                                 resumed run sees the same data)
  loss_fn(model, raw_model, batch) -> (loss, {name: float})
where `model` may be the DDP wrapper (use it for the trained forward) and `raw_model` the
module itself (use it for anything else, e.g. a reference forward under disable_adapters).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .utils.config import is_real
from .utils.io import atomic_write, read_json, remove_stale_temporaries_in, sha256_file, write_json
from .utils.locking import folder_lock
from .utils.saved_folder import loading, safe_member
from .utils.tensors import check_tensor, load_safetensors

STATE_NAME = "trainer_state.json"


@dataclass
class TrainConfig:
    steps: int = 200
    grad_accum: int = 1            # micro-batches per optimizer step
    lr: float = 2e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0     # 0 disables clipping
    seed: int = 0
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 50     # steps; a final checkpoint is always written
    resume: bool = True            # continue from checkpoint_dir when it holds a checkpoint
    progress: bool = True
    amp: str = "auto"              # "auto": bf16 autocast on CUDA, none on CPU; "bf16"; "none"
    # what the run trains on (model, adapter, data): stored with each checkpoint, and a
    # checkpoint with another fingerprint is refused on resume
    fingerprint: Optional[dict] = None

    def __post_init__(self):
        for name in ("steps", "grad_accum", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not (is_real(self.lr) and self.lr > 0):
            raise ValueError(f"TrainConfig.lr must be a finite number > 0, got {self.lr}")
        for name in ("weight_decay", "max_grad_norm"):
            if not (is_real(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"TrainConfig.{name} must be a finite number >= 0, got "
                                 f"{getattr(self, name)}")
        if self.amp not in ("auto", "bf16", "none"):
            raise ValueError(f"TrainConfig.amp must be 'auto', 'bf16' or 'none', got {self.amp!r}")


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # one row per optimizer step
    resumed_from: int = 0


def init_distributed() -> tuple[int, int]:
    """(rank, world): joins the torchrun process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------- checkpoints
CKPT_NAME = re.compile(r"ckpt-\d+\.safetensors")


def save_checkpoint(directory: str, step: int, model: nn.Module, optimizer, history,
                    fingerprint: Optional[dict] = None) -> None:
    """Tensors to ckpt-<step>.safetensors, then trainer_state.json naming it with its
    SHA-256 (computed on the temporary this save wrote, before its rename; both files
    atomic and flushed to disk), so a crash at any point leaves the previous checkpoint
    intact; removes older tensor files and killed saves' temporaries. Holds the folder's
    exclusive lock (moe_ext.utils.locking), so two saves never interleave and
    load_checkpoint never reads half of one."""
    os.makedirs(directory, exist_ok=True)
    with folder_lock(directory, exclusive=True):
        _save_checkpoint(directory, step, model, optimizer, history, fingerprint)


def _save_checkpoint(directory: str, step: int, model: nn.Module, optimizer, history,
                     fingerprint: Optional[dict]) -> None:
    remove_stale_temporaries_in(directory)
    tensors = {f"param.{n}": p.detach().contiguous().cpu() for n, p in trainable_parameters(model)}
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"opt.{idx}.{key}"] = torch.as_tensor(value).contiguous().cpu()
    tensors["rng.torch"] = torch.get_rng_state()
    name = f"ckpt-{step}.safetensors"
    path = os.path.join(directory, name)
    written = {}

    def write(tmp: str) -> None:
        save_file(tensors, tmp)
        written["sha256"] = sha256_file(tmp)  # this save's bytes, not the shared path's

    atomic_write(path, write)
    meta = {"step": step, "tensors": name, "sha256": written["sha256"],
            "param_groups": opt["param_groups"], "history": history, "fingerprint": fingerprint}
    write_json(os.path.join(directory, STATE_NAME), meta, indent=None)
    for old in os.listdir(directory):  # keep only the checkpoint the state points to
        if CKPT_NAME.fullmatch(old) and old != name:
            os.remove(os.path.join(directory, old))


def read_trainer_state(directory: str) -> dict:
    """trainer_state.json, checked: its fields' types, its tensor file a ckpt-<step>
    file inside `directory` whose SHA-256 matches (when recorded); ValueError naming the
    file and the field."""
    path = os.path.join(directory, STATE_NAME)
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: not a JSON object")
    name = meta.get("tensors")
    if not (isinstance(name, str) and CKPT_NAME.fullmatch(name)):
        raise ValueError(f"{path}: field 'tensors' must name a ckpt-<step>.safetensors file "
                         f"in the same folder, got {name!r}")
    safe_member(directory, name, f"{path}: field 'tensors'")
    for key, kind in (("step", int), ("param_groups", list), ("history", list)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise ValueError(f"{path}: field {key!r} must be a{'n' if kind is int else ''} "
                             f"{kind.__name__}, got {meta.get(key)!r}")
    tensors = os.path.join(directory, name)
    if not os.path.isfile(tensors):
        raise ValueError(f"{path}: its tensor file {tensors} is missing")
    digest = meta.get("sha256")
    if digest is not None and sha256_file(tensors) != digest:
        raise ValueError(f"{tensors} does not match the SHA-256 recorded in {path}")
    return meta


def load_checkpoint(directory: str, model: nn.Module, optimizer,
                    fingerprint: Optional[dict] = None) -> tuple[int, list]:
    """Restores parameters, optimizer state and RNG; returns (step, history). ValueError
    when the checkpoint is invalid (see read_trainer_state) or was written for another
    fingerprint (model, adapter or data)."""
    with loading(directory):  # the state and the tensors of one save
        return _load_checkpoint(directory, model, optimizer, fingerprint)


def _load_checkpoint(directory: str, model: nn.Module, optimizer,
                     fingerprint: Optional[dict]) -> tuple[int, list]:
    meta = read_trainer_state(directory)
    saved = meta.get("fingerprint")
    if fingerprint is not None and saved != fingerprint:
        differ = sorted(k for k in set(fingerprint) | set(saved if isinstance(saved, dict) else {})
                        if (saved if isinstance(saved, dict) else {}).get(k) != fingerprint.get(k))
        raise ValueError(f"the checkpoint in {directory!r} was trained on another "
                         f"{', '.join(differ)}; use another output folder")
    path = os.path.join(directory, meta["tensors"])
    tensors = load_safetensors(path, meta.get("sha256"))
    params = dict(trainable_parameters(model))
    for name, p in params.items():
        key = f"param.{name}"
        if key not in tensors:
            raise ValueError(f"{path}: no tensor for parameter {name}; the checkpoint in "
                             f"{directory!r} does not match the model")
        check_tensor(path, key, tensors[key], tuple(p.shape))
    if "rng.torch" not in tensors or tensors["rng.torch"].dtype != torch.uint8:
        raise ValueError(f"{path}: missing or malformed tensor 'rng.torch'")
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value.to(next(iter(params.values())).device) \
                if name != "step" else value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: the optimizer state does not fit ({err})") from None
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param.{name}"])
    torch.set_rng_state(tensors["rng.torch"])
    return meta["step"], meta["history"]


def has_checkpoint(directory: Optional[str]) -> bool:
    return bool(directory) and os.path.isfile(os.path.join(directory, STATE_NAME))


# ---------------------------------------------------------------- the loop
def train(model: nn.Module, batch_fn: Callable, loss_fn: Callable, config: TrainConfig,
          describe: str = "train") -> TrainResult:
    rank, world = init_distributed()
    torch.manual_seed(config.seed + rank)
    params = [p for _, p in trainable_parameters(model)]
    if not params:
        raise ValueError("model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    result = TrainResult()
    start = 0
    if config.resume and has_checkpoint(config.checkpoint_dir):
        start, result.history = load_checkpoint(config.checkpoint_dir, model, optimizer,
                                                config.fingerprint)
        result.resumed_from = start
    wrapped = model
    if world > 1:
        device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    device = params[0].device
    use_bf16 = config.amp == "bf16" or (config.amp == "auto" and device.type == "cuda")

    bar = tqdm(range(start, config.steps), desc=describe, initial=start, total=config.steps,
               disable=not config.progress or rank != 0, dynamic_ncols=True)
    model.train()
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for micro in range(config.grad_accum):
            batch = batch_fn(step, micro, rank, world)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss, metrics = loss_fn(wrapped, model, batch)
            (loss / config.grad_accum).backward()
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + float(v) / config.grad_accum
        if config.max_grad_norm > 0:
            totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
        optimizer.step()
        if world > 1:  # average the metrics so every rank logs the same numbers
            t = torch.tensor([totals[k] for k in sorted(totals)], device=device)
            dist.all_reduce(t)
            totals = {k: float(v) / world for k, v in zip(sorted(totals), t)}
        result.history.append({"step": step + 1, **totals})
        bar.set_postfix({k: f"{v:.3f}" for k, v in list(totals.items())[:3]})
        done = step + 1
        if config.checkpoint_dir and rank == 0 and (done % config.checkpoint_every == 0
                                                    or done == config.steps):
            save_checkpoint(config.checkpoint_dir, done, model, optimizer, result.history,
                            config.fingerprint)
        if world > 1 and config.checkpoint_dir:
            dist.barrier()
    bar.close()
    return result
