"""The PMoL job end to end, for the CLI (`moe-ext train-pmol`), the demo and the
experiments: data and tokenizer, base model (the built-in tiny Llama, or any causal LM by
hub id or folder), adapter, training, held-out evaluation, and the artefact on disk with
its save and load."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Callable, Optional, Union

from torch import nn

from ..data import PreferenceExample, check_lengths, load_preferences
from ..hf.models import check_dtype, load_adapter_tokenizer, load_molora_model, load_pretrained, load_tokenizer
from ..molora import base_state_dict, get_molora_model, load_molora, save_molora
from ..training import TrainConfig, TrainResult, has_checkpoint, init_distributed
from ..utils.io import read_json, remove_stale_temporaries_in, write_json
from ..utils.locking import folder_lock
from ..utils.saved_folder import loading, replace_folder_files
from . import synthetic
from .dpo import DPOConfig, pmol_config
from .tokenizer import word_tokenizer_from_examples
from .train import evaluate_pmol, train_pmol


@dataclass
class PMoLJob:
    """Every knob of a PMoL run (the `moe-ext train-pmol` options)."""
    data: Optional[str] = None        # JSONL/JSON/Parquet file, datasets folder or name; None: synthetic
    split: str = "train"              # split of a datasets folder or name
    preference_column: str = "preference"  # the row's preference (group); missing: no group loss
    synthetic_size: int = 300         # synthetic examples per preference
    eval_fraction: float = 0.2        # held-out share of the examples (taken first)
    model: Optional[str] = None       # causal LM hub id or folder; None: the built-in tiny Llama
    tokenizer: Optional[str] = None   # default: the model's (the built-in word tokenizer without a model)
    dtype: str = "float32"            # "auto", "float32", "bfloat16", "float16"
    max_length: Optional[int] = None  # prompt + response tokens (responses truncated)
    max_prompt_length: Optional[int] = None  # prompt tokens (kept from the end)
    chat_template: bool = True        # render rows with the tokenizer's chat template if it has one
    init_adapter: Optional[str] = None  # start from this MoLoRA adapter (e.g. from PEFT LoRAs)
    experts_per_group: int = 2
    null_experts: int = 1
    top_k: int = 2
    rank: int = 4                     # LoRA rank r of each expert
    alpha: float = 8.0                # lora_alpha
    target_modules: Union[str, list] = "all-linear"  # PEFT's forms: list, regex or "all-linear"
    group_loss_coef: float = 0.5
    aux_loss_coef: float = 0.01
    hidden: int = 64                  # width of the built-in base model
    layers: int = 2                   # depth of the built-in base model
    steps: int = 150
    batch_size: int = 16              # examples per micro-step and rank
    grad_accum: int = 1
    lr: float = 3e-3
    beta: float = 0.5                 # DPO beta
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0            # weight of the chosen responses' NLL (RPO; TRL's rpo_alpha)
    # steerable PMoL: routers that take a preference mix, trained over mixes ~ Dirichlet(mix_alpha)
    mix_alpha: Optional[float] = None
    mix_none_prob: float = 0.25       # share of steps without a mix (the prompt decides)
    checkpoint_every: int = 50
    resume: bool = False              # continue the checkpoint in output/checkpoint
    seed: int = 0
    progress: bool = True

    def molora_config(self, groups: list[str]):
        return pmol_config(groups, self.experts_per_group, self.null_experts, r=self.rank,
                           lora_alpha=self.alpha, top_k=self.top_k,
                           target_modules=self.target_modules,
                           group_loss_coef=self.group_loss_coef,
                           router_aux_loss_coef=self.aux_loss_coef,
                           steerable=self.mix_alpha is not None)

    def validate(self, groups: list[str]) -> None:
        """ValueError naming the bad option: builds the configs, runs nothing."""
        self.molora_config(groups), self.dpo_config(), self.train_config()
        check_dtype(self.dtype)
        check_lengths(self.max_length, self.max_prompt_length)
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")

    def encode_options(self) -> dict:
        return {"max_length": self.max_length, "max_prompt_length": self.max_prompt_length,
                "chat_template": self.chat_template}

    def dpo_config(self) -> DPOConfig:
        return DPOConfig(beta=self.beta, label_smoothing=self.label_smoothing,
                         rpo_alpha=self.rpo_alpha, mix_alpha=self.mix_alpha,
                         mix_none_prob=self.mix_none_prob)

    def train_config(self, checkpoint_dir: Optional[str] = None,
                     fingerprint: Optional[dict] = None) -> TrainConfig:
        return TrainConfig(steps=self.steps, grad_accum=self.grad_accum, lr=self.lr,
                           seed=self.seed, checkpoint_dir=checkpoint_dir,
                           checkpoint_every=self.checkpoint_every, resume=self.resume,
                           progress=self.progress, fingerprint=fingerprint)


@dataclass
class PMoLData:
    train: list[PreferenceExample]
    eval: list[PreferenceExample]
    tokenizer: object                 # any PreTrainedTokenizerBase
    groups: list[str]                 # the preference labels, sorted


def prepare_data(job: PMoLJob) -> PMoLData:
    """The job's examples (its data or the synthetic set) split into train and held-out,
    the tokenizer (the job's, the model's, or the built-in word tokenizer over the data)
    and the sorted preference groups. ValueError or OSError for bad data."""
    if job.data:
        examples = load_preferences(job.data, job.preference_column, job.split)
    else:
        examples = synthetic.synthetic_preference_data(job.synthetic_size, seed=job.seed)
    if job.tokenizer or job.model:
        tokenizer = load_tokenizer(job.tokenizer or job.model)
    elif job.data:
        tokenizer = word_tokenizer_from_examples(examples)
    else:
        tokenizer = synthetic.synthetic_tokenizer()
    n_eval = max(1, int(len(examples) * job.eval_fraction))
    if len(examples) - n_eval < 1:
        raise ValueError(f"need at least 2 examples, got {len(examples)}")
    groups = sorted({str(e.preference) for e in examples if e.preference is not None})
    if not groups:
        raise ValueError(f"no row of {job.data} has a preference label in column "
                         f"{job.preference_column!r}; PMoL needs at least one labelled group")
    return PMoLData(examples[n_eval:], examples[:n_eval], tokenizer, groups)


def prepare_model(job: PMoLJob, prepared: PMoLData) -> nn.Module:
    """The base model (job.model or the built-in tiny Llama) with the PMoL adapter: fresh,
    or job.init_adapter. ValueError for target modules or an adapter that do not fit."""
    if job.model:
        base = load_pretrained(job.model, dtype=job.dtype)
    else:
        base = synthetic.build_tiny_causal_lm(len(prepared.tokenizer), hidden=job.hidden,
                                              layers=job.layers, seed=job.seed)
    if not job.init_adapter:
        return get_molora_model(base, job.molora_config(prepared.groups))
    model = load_molora(base, job.init_adapter)
    missing = [g for g in prepared.groups if g not in model.molora_config.expert_groups]
    if missing:
        raise ValueError(f"the adapter in {job.init_adapter!r} has no expert group for the "
                         f"preferences {missing} of the data")
    return model


def fingerprint(job: PMoLJob, prepared: PMoLData, model: nn.Module) -> dict:
    """What a checkpoint must have been trained on to be resumed: the base model, the
    adapter config, the tokenisation and the training examples."""
    rows = json.dumps([dataclasses.asdict(e) for e in prepared.train], sort_keys=True)
    base = job.model or f"built-in tiny Llama (hidden {job.hidden}, layers {job.layers}, seed {job.seed})"
    value = {"model": base, "adapter": model.molora_config.to_dict(),
             "tokenizer": getattr(prepared.tokenizer, "name_or_path", "") or len(prepared.tokenizer),
             "encoding": job.encode_options(), "data": hashlib.sha256(rows.encode()).hexdigest()}
    return json.loads(json.dumps(value))


def check_resume(job: PMoLJob, output: Optional[str]) -> None:
    """ValueError when output/checkpoint holds a checkpoint and the job does not resume."""
    if output and not job.resume and has_checkpoint(os.path.join(output, "checkpoint")):
        raise ValueError(f"{os.path.join(output, 'checkpoint')} holds a checkpoint of an earlier "
                         "run; pass --resume to continue it, or choose another --output")


@dataclass
class PMoLRun:
    """A trained PMoL model and what came with it; `save` writes the artefact."""
    model: nn.Module
    tokenizer: object
    metrics: dict
    history: list[dict]
    base: Optional[str] = None        # the base model's hub id or folder; None: the built-in one

    def save(self, directory: str) -> None:
        """directory/adapter (save_molora, with the tokenizer), metrics.json and, for the
        built-in base, directory/base_model (HF format, with the tokenizer), which the
        adapter records as its base. Holds `directory`'s exclusive lock throughout (another
        save waits, a load_pmol waits for it). Each part is written so that a killed save
        leaves it whole: the adapter and its tokenizer in one step (saved_folder), the base
        model file by file, only where the bytes changed (saving the same frozen base
        again rewrites nothing), metrics.json atomically, last."""
        os.makedirs(directory, exist_ok=True)
        with folder_lock(directory, exclusive=True):
            remove_stale_temporaries_in(directory)
            if self.base is None:
                base_dir = os.path.abspath(os.path.join(directory, "base_model"))

                def write_base(tmp: str) -> None:
                    type(self.model).save_pretrained(self.model, tmp,
                                                     state_dict=base_state_dict(self.model))
                    self.tokenizer.save_pretrained(tmp)

                replace_folder_files(base_dir, write_base)
                self.model.config.name_or_path = base_dir
            save_molora(self.model, os.path.join(directory, "adapter"), tokenizer=self.tokenizer)
            write_json(os.path.join(directory, "metrics.json"), self.metrics)


def load_pmol(directory: str) -> PMoLRun:
    """Reads an artefact written by `run_pmol_job` / PMoLRun.save: the base model with the
    adapter injected (eval mode), the tokenizer and the metrics."""
    adapter = os.path.join(directory, "adapter")
    if not os.path.isdir(adapter):
        raise FileNotFoundError(f"no adapter folder in {directory!r}")
    with loading(directory):  # not during a PMoLRun.save to the same folder
        return _load_pmol(directory, adapter)


def _load_pmol(directory: str, adapter: str) -> PMoLRun:
    base_dir = os.path.join(directory, "base_model")
    base = base_dir if os.path.isdir(base_dir) else None
    model = load_molora_model(adapter, base)
    metrics_path = os.path.join(directory, "metrics.json")
    metrics = read_json(metrics_path) if os.path.isfile(metrics_path) else {}
    return PMoLRun(model, load_adapter_tokenizer(adapter, base), metrics, [],
                   None if base else model.config.name_or_path)


def run_pmol_job(job: PMoLJob, output: Optional[str] = None,
                 prepared: Optional[PMoLData] = None, model: Optional[nn.Module] = None,
                 log: Callable[[str], None] = lambda msg: None) -> PMoLRun:
    """Trains the job's PMoL adapter with DPO and the router losses (checkpointing to
    output/checkpoint when `output` is given: an existing checkpoint is continued only with
    job.resume, and only if it was trained on the same model, adapter and data), evaluates
    it on the held-out examples and, on rank 0, saves the artefact to `output`. Runs under
    torchrun (DDP). `prepared` and `model` override prepare_data / prepare_model."""
    prepared = prepared or prepare_data(job)
    model = model if model is not None else prepare_model(job, prepared)
    check_resume(job, output)
    train_config = job.train_config(os.path.join(output, "checkpoint") if output else None,
                                    fingerprint(job, prepared, model))
    rank, _ = init_distributed()
    log(f"PMoL: DPO + expert-group loss for {job.steps} steps")
    result: TrainResult = train_pmol(model, prepared.train, prepared.tokenizer, train_config,
                                     job.dpo_config(), batch_size=job.batch_size,
                                     **job.encode_options())
    report = evaluate_pmol(model, prepared.eval, prepared.tokenizer, beta=job.beta,
                           **job.encode_options())
    metrics = {"train": result.history[-1] if result.history else {}, "eval": report,
               "resumed_from": result.resumed_from, "groups": prepared.groups,
               "job": dataclasses.asdict(job)}
    run = PMoLRun(model, prepared.tokenizer, metrics, result.history, job.model)
    if output and rank == 0:
        run.save(output)
    return run
