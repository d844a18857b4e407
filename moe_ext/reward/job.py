"""The reward-model jobs end to end, for the CLI (`moe-ext train-rm`, `moe-ext adapt`), the
demo and the experiments: data (text pairs through an encoder, or the synthetic category
world; text pairs as strings for a backbone model), training (embedding mode, or a
transformers backbone with optional MoLoRA layers), held-out evaluation, the saved model
with its train_info.json, and the adaptation of a saved model to one user."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from ..data import flatten, load_preferences
from ..molora import MoLoRAConfig
from ..training import TrainConfig
from ..utils.io import read_json
from ..utils.saved_folder import loading
from . import synthetic
from .adapt import METHODS, adapt, average_routing, pairwise_accuracy, purity_nmi
from .backbone import BackboneRewardModel, text_batches, train_backbone_reward_model
from .embed import embed
from .fit import FitConfig, fit
from .model import SparseMoERewardModel
from .saving import load_reward_model, save_reward_model

INFO_NAME = "train_info.json"


@dataclass
class RewardJob:
    """Every knob of a reward-model run (the `moe-ext train-rm` options). epochs,
    batch_size and lr default by mode (embedding 40, 128, 1e-2; backbone 3, 16, 2e-3)."""
    data: Optional[str] = None       # pairs in a TRL format (optional int category column)
    synthetic_pairs: int = 6000      # without data: pairs of the synthetic category world
    encoder: str = "hashing"         # text encoder for data: "hashing" or "minilm"
    backbone: Optional[str] = None   # transformers model folder or name: backbone mode
    pooling: str = "mean"            # backbone mode: "mean" or "last" (decoders)
    max_length: int = 128            # backbone mode: tokenizer truncation
    molora_experts: int = 0          # backbone mode: MoLoRA experts per layer (0: none)
    molora_rank: int = 4
    molora_top_k: int = 1
    molora_targets: str = "all-linear"
    router_aux_loss_coef: float = 0.01   # MoLoRA load balance, counted in the loss
    router_z_loss_coef: float = 0.001    # MoLoRA router z-loss, counted in the loss
    train_backbone: bool = False     # backbone mode: fine-tune the backbone's own weights
    experts: int = 6
    top_k: int = 1
    expert_hidden: Optional[int] = None
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    objective: str = "mixture"
    sparsity_coef: float = 0.05
    balance_coef: float = 0.1
    diversity_coef: float = 0.05
    test_fraction: float = 0.2       # held-out share of the pairs (taken first)
    seed: int = 0
    progress: bool = True

    def _default(self, name: str, embedding, backbone):
        value = getattr(self, name)
        return value if value is not None else (backbone if self.backbone else embedding)

    def fit_config(self) -> FitConfig:
        return FitConfig(epochs=self._default("epochs", 40, 3),
                         batch_size=self._default("batch_size", 128, 16),
                         lr=self._default("lr", 1e-2, 2e-3), objective=self.objective,
                         sparsity_coef=self.sparsity_coef, balance_coef=self.balance_coef,
                         diversity_coef=self.diversity_coef, seed=self.seed,
                         progress=self.progress)

    def molora_config(self) -> Optional[MoLoRAConfig]:
        """The MoLoRA config of the backbone (None without MoLoRA experts); ValueError for
        backbone options given without a backbone."""
        if self.molora_experts < 0:
            raise ValueError(f"molora_experts must be >= 0, got {self.molora_experts}")
        if (self.molora_experts or self.train_backbone) and not self.backbone:
            raise ValueError("--molora-experts and --train-backbone need --backbone")
        if not self.molora_experts:
            return None
        return MoLoRAConfig(r=self.molora_rank, lora_alpha=2.0 * self.molora_rank,
                            num_experts=self.molora_experts, top_k=self.molora_top_k,
                            target_modules=self.molora_targets,
                            router_aux_loss_coef=self.router_aux_loss_coef,
                            router_z_loss_coef=self.router_z_loss_coef)


@dataclass
class RewardData:
    """Pairs as embeddings (prompt (n, P), chosen / rejected (n, Dr)) or, for backbone
    models, as lists of n strings."""
    prompt: Union[torch.Tensor, list[str]]
    chosen: Union[torch.Tensor, list[str]]
    rejected: Union[torch.Tensor, list[str]]
    label: Optional[torch.Tensor]    # (n,) int category, or None
    source: dict = field(default_factory=dict)  # how to rebuild the data (train_info.json)

    def __len__(self) -> int:
        return len(self.prompt)

    def split(self, n_first: int) -> tuple["RewardData", "RewardData"]:
        """(the first n_first pairs, the rest)."""
        def part(s):
            return RewardData(self.prompt[s], self.chosen[s], self.rejected[s],
                              None if self.label is None else self.label[s], self.source)
        return part(slice(0, n_first)), part(slice(n_first, None))


def read_text_rows(path: str) -> list[dict]:
    """Preference pairs in any TRL format and source (moe_ext.data.load_preferences; an
    optional integer `category` column) as rows of prompt, chosen, rejected strings
    (conversational fields as "role: content" lines) and category; ValueError naming the
    file, line and field for bad rows."""
    try:
        pairs = load_preferences(path, label_column="category")
    except FileNotFoundError:
        raise ValueError(f"data file not found: {path!r}") from None
    if len(pairs) < 2:
        raise ValueError(f"{path}: need at least 2 pairs, got {len(pairs)}")
    return [{"prompt": flatten(r.prompt), "chosen": flatten(r.chosen),
             "rejected": flatten(r.rejected), "category": r.preference} for r in pairs]


def text_rows_data(rows: list[dict], encoder: Optional[str], source: dict) -> RewardData:
    """Rows of prompt / chosen / rejected strings (optional integer `category`) as pairs of
    strings (encoder None: backbone mode) or of embeddings through `encoder`."""
    cats = [r.get("category") for r in rows]
    label = torch.tensor(cats) if all(isinstance(c, int) for c in cats) else None
    fields = [[r[k] for r in rows] for k in ("prompt", "chosen", "rejected")]
    if encoder is not None:
        fields = [embed(texts, encoder) for texts in fields]
    return RewardData(*fields, label, source)


def load_text_pairs(path: str, encoder: Optional[str]) -> RewardData:
    """The pairs of read_text_rows as embeddings through `encoder` ("hashing" or "minilm"),
    or as strings when encoder is None (backbone mode)."""
    source = {"kind": "text", "data": os.path.abspath(path)}
    if encoder is not None:
        source["encoder"] = encoder
    return text_rows_data(read_text_rows(path), encoder, source)


def load_reward_data(job: RewardJob) -> RewardData:
    """The job's pairs: its text file through its encoder (as strings in backbone mode), or
    the synthetic category world with as many criteria as experts (seeded by job.seed; in
    backbone mode its text form, synthetic_pairs split over its three categories)."""
    if job.data:
        return load_text_pairs(job.data, None if job.backbone else job.encoder)
    if job.backbone:
        rows = synthetic.text_category_rows(max(1, job.synthetic_pairs // 3), seed=job.seed)
        return text_rows_data(rows, None, {"kind": "synthetic_text", "seed": job.seed})
    task = synthetic.make_task(num_criteria=job.experts, seed=job.seed)
    pairs = synthetic.category_pairs(task, job.synthetic_pairs, seed=job.seed + 1)
    return RewardData(pairs.prompt, pairs.chosen, pairs.rejected, pairs.label,
                      {"kind": "synthetic", "task_seed": job.seed, "criteria": job.experts})


def evaluate_reward_model(model: nn.Module, test: RewardData) -> dict:
    """Held-out pairwise accuracy, mean expert use and, with category labels, router
    purity and NMI (either mode)."""
    metrics = {"test_accuracy": pairwise_accuracy(model, test.prompt, test.chosen, test.rejected),
               "test_pairs": len(test),
               "expert_use": average_routing(model, test.prompt).tolist()}
    if test.label is not None:
        purity, nmi = purity_nmi(model.route(test.prompt).argmax(-1), test.label)
        metrics.update(router_purity=purity, router_nmi=nmi)
    return metrics


@dataclass
class RewardRun:
    model: nn.Module                 # SparseMoERewardModel or BackboneRewardModel
    metrics: dict
    history: list[dict]
    source: dict

    def save(self, directory: str) -> None:
        """The model (reward_config.json + reward_model.safetensors) and train_info.json,
        in one step."""
        save_reward_model(self.model, directory, extra_json={
            INFO_NAME: {"source": self.source, "metrics": self.metrics}})


def train_reward_job(job: RewardJob, data: Optional[RewardData] = None,
                     test: Optional[RewardData] = None) -> RewardRun:
    """Trains a sparse MoE reward model on the job's data (or `data`) and evaluates it on
    `test`, or, without `test`, on the first test_fraction of the pairs, held out."""
    data = data if data is not None else load_reward_data(job)
    if test is not None:
        train = data
    else:
        test, train = data.split(max(1, int(len(data) * job.test_fraction)))
    if len(train) == 0:
        raise ValueError(f"no training pairs left after holding out {len(test)} for the test")
    torch.manual_seed(job.seed)
    cfg = job.fit_config()
    molora = job.molora_config()
    if job.backbone:
        model = BackboneRewardModel.from_backbone(
            job.backbone, job.experts, job.top_k, molora=molora,
            train_backbone=job.train_backbone, expert_hidden=job.expert_hidden,
            pooling=job.pooling, max_length=job.max_length)
        batch_fn, per_epoch = text_batches(model, train.prompt, train.chosen, train.rejected,
                                           cfg.batch_size, job.seed)
        history = train_backbone_reward_model(
            model, batch_fn, TrainConfig(steps=cfg.epochs * per_epoch, lr=cfg.lr, seed=job.seed,
                                         progress=job.progress), cfg).history
        source = {**data.source, "backbone": job.backbone}
    else:
        model = SparseMoERewardModel(data.prompt.shape[1], data.chosen.shape[1], job.experts,
                                     job.top_k, job.expert_hidden)
        history = fit(model, train.prompt, train.chosen, train.rejected, cfg)
        source = data.source
    metrics = {"train": history[-1], **evaluate_reward_model(model, test)}
    return RewardRun(model, metrics, history, source)


def load_reward_run(directory: str) -> tuple[nn.Module, dict]:
    """A model saved by RewardRun.save and its train_info (source, metrics), both from the
    same save (read under the folder's shared lock: a save to it meanwhile waits)."""
    with loading(directory):
        model = load_reward_model(directory)
        return model, read_json(os.path.join(directory, INFO_NAME))


def adapt_user(directory: str, data: Optional[str] = None, synthetic_user: Optional[int] = None,
               pairs: int = 16, method: str = "gradient", eta: float = 0.1,
               beta: float = 1.0) -> dict:
    """Adapts the model saved in `directory` to one user: from the first `pairs` rows of
    the user's JSONL `data` (the rest are held out), or to a synthetic user of the model's
    own synthetic world (embedding mode). Returns the weights, the mean routing, the shift
    (the user's profile) and, where there are held-out pairs, the accuracy before and after."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    model, info = load_reward_run(directory)
    source = info["source"]
    truth = None
    if data is not None:
        if "encoder" not in source and not isinstance(model, BackboneRewardModel):
            raise ValueError("this reward model was trained on synthetic embeddings; use "
                             "--synthetic-user")
        few, held = load_text_pairs(data, source.get("encoder")).split(pairs)
    else:
        if isinstance(model, BackboneRewardModel):
            raise ValueError("--synthetic-user needs an embedding-mode model trained with "
                             "--synthetic; give a backbone model the user's pairs with --data")
        if source["kind"] != "synthetic":
            raise ValueError("--synthetic-user needs a reward model trained with --synthetic")
        if synthetic_user is None or synthetic_user < 0:
            raise ValueError(f"--synthetic-user must be an index >= 0, got {synthetic_user}")
        task = synthetic.make_task(num_criteria=source["criteria"], seed=source["task_seed"])
        truth = synthetic.sample_users(task, synthetic_user + 1, seed=1234)[synthetic_user]
        p = synthetic.user_pairs(task, truth, pairs, seed=10 + synthetic_user)
        q = synthetic.user_pairs(task, truth, 500, seed=20_000 + synthetic_user)
        few = RewardData(p.prompt, p.chosen, p.rejected, None)
        held = RewardData(q.prompt, q.chosen, q.rejected, None)
    weights = adapt(model, few.prompt, few.chosen, few.rejected, method=method, eta=eta,
                    beta=beta)
    prior = average_routing(model, few.prompt)
    result = {"method": method, "pairs": len(few), "weights": weights.tolist(),
              "mean_routing": prior.tolist(), "shift": (weights - prior).tolist()}
    if len(held) > 0:
        result["heldout_accuracy_adapted"] = pairwise_accuracy(model, held.prompt, held.chosen,
                                                               held.rejected, weights)
        result["heldout_accuracy_routed"] = pairwise_accuracy(model, held.prompt, held.chosen,
                                                              held.rejected)
        result["heldout_pairs"] = len(held)
    if truth is not None:
        result["true_profile_over_criteria"] = truth.tolist()
    return result
