"""The PMoL job end to end, for the CLI (`moe-ext train-pmol`), the demo and the
experiments: data, base model, adapter, training, held-out evaluation, and the artefact on
disk (base model, adapter, tokenizer, metrics) with its save and load."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from ..molora import base_state_dict, get_molora_model, load_molora, save_molora
from ..training import TrainConfig, TrainResult, init_distributed
from ..utils.io import read_json, write_json
from . import data, synthetic
from .dpo import DPOConfig, pmol_config
from .tokenizer import WordTokenizer
from .train import evaluate_pmol, train_pmol


@dataclass
class PMoLJob:
    """Every knob of a PMoL run (the `moe-ext train-pmol` options)."""
    data: Optional[str] = None        # JSONL path; None: the built-in synthetic data
    synthetic_size: int = 300         # synthetic examples per preference
    eval_fraction: float = 0.2        # held-out share of the examples (taken first)
    experts_per_group: int = 2
    null_experts: int = 1
    top_k: int = 2
    rank: int = 4                     # LoRA rank r of each expert
    alpha: float = 8.0                # lora_alpha
    target_modules: str = "all-linear"
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
    checkpoint_every: int = 50
    resume: bool = True
    seed: int = 0
    progress: bool = True

    def molora_config(self, groups: list[str]):
        return pmol_config(groups, self.experts_per_group, self.null_experts, r=self.rank,
                           lora_alpha=self.alpha, top_k=self.top_k,
                           target_modules=self.target_modules,
                           group_loss_coef=self.group_loss_coef,
                           router_aux_loss_coef=self.aux_loss_coef)

    def validate(self, groups: list[str]) -> None:
        """ValueError naming the bad option: builds the configs, runs nothing."""
        self.molora_config(groups), self.dpo_config(), self.train_config()

    def dpo_config(self) -> DPOConfig:
        return DPOConfig(beta=self.beta, label_smoothing=self.label_smoothing)

    def train_config(self, checkpoint_dir: Optional[str] = None) -> TrainConfig:
        return TrainConfig(steps=self.steps, grad_accum=self.grad_accum, lr=self.lr,
                           seed=self.seed, checkpoint_dir=checkpoint_dir,
                           checkpoint_every=self.checkpoint_every, resume=self.resume,
                           progress=self.progress)


@dataclass
class PMoLData:
    train: list[data.PreferenceExample]
    eval: list[data.PreferenceExample]
    tokenizer: WordTokenizer
    groups: list[str]


def prepare_data(job: PMoLJob) -> PMoLData:
    """The job's examples (its JSONL file or the synthetic set) split into train and
    held-out, the tokenizer over them and the sorted preference groups. ValueError or
    OSError for bad data."""
    if job.data:
        examples = data.load_preference_jsonl(job.data)
        tokenizer = WordTokenizer.from_examples(examples)
    else:
        examples = synthetic.synthetic_preference_data(job.synthetic_size, seed=job.seed)
        tokenizer = synthetic.synthetic_tokenizer()
    n_eval = max(1, int(len(examples) * job.eval_fraction))
    if len(examples) - n_eval < 1:
        raise ValueError(f"need at least 2 examples, got {len(examples)}")
    groups = sorted({e.preference for e in examples})
    return PMoLData(examples[n_eval:], examples[:n_eval], tokenizer, groups)


@dataclass
class PMoLRun:
    """A trained PMoL model and what came with it; `save` writes the artefact."""
    model: nn.Module
    tokenizer: WordTokenizer
    metrics: dict
    history: list[dict]

    def save(self, directory: str) -> None:
        """directory/base_model (the frozen base, HF format), adapter (save_molora),
        tokenizer.json, metrics.json."""
        self.model.save_pretrained(os.path.join(directory, "base_model"),
                                   state_dict=base_state_dict(self.model))
        save_molora(self.model, os.path.join(directory, "adapter"))
        write_json(os.path.join(directory, "tokenizer.json"), self.tokenizer.to_dict())
        write_json(os.path.join(directory, "metrics.json"), self.metrics)


def load_pmol(directory: str) -> PMoLRun:
    """Reads an artefact written by `run_pmol_job` / PMoLRun.save: the base model with the
    adapter injected (eval mode), the tokenizer and the metrics."""
    from transformers import AutoModelForCausalLM

    base = os.path.join(directory, "base_model")
    if not os.path.isdir(base):
        raise FileNotFoundError(f"no base_model folder in {directory!r}")
    model = load_molora(AutoModelForCausalLM.from_pretrained(base), os.path.join(directory, "adapter"))
    vocab = read_json(os.path.join(directory, "tokenizer.json"))
    if vocab.get("type") != "word":
        raise ValueError(f"{directory}/tokenizer.json: not a moe_ext word tokenizer")
    tokenizer = WordTokenizer(vocab["vocab"])
    metrics_path = os.path.join(directory, "metrics.json")
    metrics = read_json(metrics_path) if os.path.isfile(metrics_path) else {}
    return PMoLRun(model.eval(), tokenizer, metrics, [])


def run_pmol_job(job: PMoLJob, output: Optional[str] = None,
                 prepared: Optional[PMoLData] = None,
                 log: Callable[[str], None] = lambda msg: None) -> PMoLRun:
    """Builds the built-in base model, injects the PMoL adapter, trains it with DPO and the
    router losses (checkpointing to output/checkpoint when `output` is given), evaluates
    it on the held-out examples and, on rank 0, saves the artefact to `output`. Runs under
    torchrun (DDP). `prepared` overrides the job's own data."""
    prepared = prepared or prepare_data(job)
    config = job.molora_config(prepared.groups)
    dpo = job.dpo_config()
    train_config = job.train_config(os.path.join(output, "checkpoint") if output else None)
    rank, _ = init_distributed()
    base = synthetic.build_tiny_causal_lm(len(prepared.tokenizer), hidden=job.hidden,
                                          layers=job.layers, seed=job.seed)
    model = get_molora_model(base, config)
    log(f"PMoL: DPO + expert-group loss for {job.steps} steps")
    result: TrainResult = train_pmol(model, prepared.train, prepared.tokenizer, train_config, dpo,
                                     batch_size=job.batch_size)
    report = evaluate_pmol(model, prepared.eval, prepared.tokenizer, beta=job.beta)
    metrics = {"train": result.history[-1] if result.history else {}, "eval": report,
               "resumed_from": result.resumed_from, "groups": prepared.groups,
               "job": dataclasses.asdict(job)}
    run = PMoLRun(model, prepared.tokenizer, metrics, result.history)
    if output and rank == 0:
        run.save(output)
    return run
