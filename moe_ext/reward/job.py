"""The reward-model jobs end to end, for the CLI (`moe-ext train-rm`, `moe-ext adapt`), the
demo and the experiments: data (text pairs through an encoder, or the synthetic category
world), training, held-out evaluation, the saved model with its train_info.json, and the
adaptation of a saved model to one user."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..data import flatten, load_preferences
from ..utils.io import read_json, write_json
from . import synthetic
from .adapt import adapt, average_routing, pairwise_accuracy, purity_nmi
from .embed import embed
from .fit import FitConfig, fit
from .model import SparseMoERewardModel
from .saving import load_reward_model, save_reward_model

INFO_NAME = "train_info.json"


@dataclass
class RewardJob:
    """Every knob of a reward-model run (the `moe-ext train-rm` options)."""
    data: Optional[str] = None       # pairs in a TRL format (optional int category column)
    synthetic_pairs: int = 6000      # without data: pairs of the synthetic category world
    encoder: str = "hashing"         # text encoder for data: "hashing" or "minilm"
    experts: int = 6
    top_k: int = 1
    expert_hidden: Optional[int] = None
    epochs: int = 40
    batch_size: int = 128
    lr: float = 1e-2
    objective: str = "mixture"
    sparsity_coef: float = 0.05
    balance_coef: float = 0.1
    diversity_coef: float = 0.05
    test_fraction: float = 0.2       # held-out share of the pairs (taken first)
    seed: int = 0
    progress: bool = True

    def fit_config(self) -> FitConfig:
        return FitConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                         objective=self.objective, sparsity_coef=self.sparsity_coef,
                         balance_coef=self.balance_coef, diversity_coef=self.diversity_coef,
                         seed=self.seed, progress=self.progress)


@dataclass
class RewardData:
    prompt: torch.Tensor             # (n, P) prompt embeddings
    chosen: torch.Tensor             # (n, Dr)
    rejected: torch.Tensor           # (n, Dr)
    label: Optional[torch.Tensor]    # (n,) int category, or None
    source: dict = field(default_factory=dict)  # how to rebuild the data (train_info.json)

    def __len__(self) -> int:
        return self.prompt.shape[0]

    def split(self, n_first: int) -> tuple["RewardData", "RewardData"]:
        """(the first n_first pairs, the rest)."""
        def part(s):
            return RewardData(self.prompt[s], self.chosen[s], self.rejected[s],
                              None if self.label is None else self.label[s], self.source)
        return part(slice(0, n_first)), part(slice(n_first, None))


def load_text_pairs(path: str, encoder: str) -> RewardData:
    """Preference pairs in any TRL format and source (moe_ext.data.load_preferences; an
    optional integer `category` column) -> embeddings of the prompt and of each response
    (conversational fields as "role: content" lines); ValueError naming the file, line and
    field for bad rows."""
    try:
        rows = load_preferences(path, label_column="category")
    except FileNotFoundError:
        raise ValueError(f"data file not found: {path!r}") from None
    if len(rows) < 2:
        raise ValueError(f"{path}: need at least 2 pairs, got {len(rows)}")
    cats = [r.preference for r in rows]
    label = torch.tensor(cats) if all(isinstance(c, int) for c in cats) else None
    return RewardData(embed([flatten(r.prompt) for r in rows], encoder),
                      embed([flatten(r.chosen) for r in rows], encoder),
                      embed([flatten(r.rejected) for r in rows], encoder), label,
                      {"kind": "text", "encoder": encoder, "data": os.path.abspath(path)})


def load_reward_data(job: RewardJob) -> RewardData:
    """The job's pairs: its text file through its encoder, or the synthetic category world
    with as many criteria as experts (seeded by job.seed)."""
    if job.data:
        return load_text_pairs(job.data, job.encoder)
    task = synthetic.make_task(num_criteria=job.experts, seed=job.seed)
    pairs = synthetic.category_pairs(task, job.synthetic_pairs, seed=job.seed + 1)
    return RewardData(pairs.prompt, pairs.chosen, pairs.rejected, pairs.label,
                      {"kind": "synthetic", "task_seed": job.seed, "criteria": job.experts})


def evaluate_reward_model(model: SparseMoERewardModel, test: RewardData) -> dict:
    """Held-out pairwise accuracy, mean expert use and, with category labels, router
    purity and NMI."""
    metrics = {"test_accuracy": pairwise_accuracy(model, test.prompt, test.chosen, test.rejected),
               "test_pairs": len(test),
               "expert_use": average_routing(model, test.prompt).tolist()}
    if test.label is not None:
        purity, nmi = purity_nmi(model.route(test.prompt).argmax(-1), test.label)
        metrics.update(router_purity=purity, router_nmi=nmi)
    return metrics


@dataclass
class RewardRun:
    model: SparseMoERewardModel
    metrics: dict
    history: list[dict]
    source: dict

    def save(self, directory: str) -> None:
        """The model (reward_config.json + reward_model.safetensors) and train_info.json."""
        save_reward_model(self.model, directory)
        write_json(os.path.join(directory, INFO_NAME), {"source": self.source,
                                                        "metrics": self.metrics})


def train_reward_job(job: RewardJob, data: Optional[RewardData] = None,
                     test: Optional[RewardData] = None) -> RewardRun:
    """Trains a sparse MoE reward model on the job's data (or `data`) and evaluates it on
    `test`, or, without `test`, on the first test_fraction of the pairs, held out."""
    data = data if data is not None else load_reward_data(job)
    if test is not None:
        train = data
    else:
        test, train = data.split(max(1, int(len(data) * job.test_fraction)))
    torch.manual_seed(job.seed)
    model = SparseMoERewardModel(data.prompt.shape[1], data.chosen.shape[1], job.experts,
                                 job.top_k, job.expert_hidden)
    history = fit(model, train.prompt, train.chosen, train.rejected, job.fit_config())
    metrics = {"train": history[-1], **evaluate_reward_model(model, test)}
    return RewardRun(model, metrics, history, data.source)


def load_reward_run(directory: str) -> tuple[SparseMoERewardModel, dict]:
    """A model saved by RewardRun.save and its train_info (source, metrics)."""
    model = load_reward_model(directory)
    return model, read_json(os.path.join(directory, INFO_NAME))


def adapt_user(directory: str, data: Optional[str] = None, synthetic_user: Optional[int] = None,
               pairs: int = 16, method: str = "gradient", eta: float = 0.1) -> dict:
    """Adapts the model saved in `directory` to one user: from the first `pairs` rows of
    the user's JSONL `data` (the rest are held out), or to a synthetic user of the model's
    own synthetic world. Returns the weights, the mean routing, the shift (the user's
    profile) and, where there are held-out pairs, the accuracy before and after."""
    model, info = load_reward_run(directory)
    source = info["source"]
    truth = None
    if data is not None:
        if source["kind"] != "text":
            raise ValueError("this reward model was trained on synthetic embeddings; use "
                             "--synthetic-user")
        few, held = load_text_pairs(data, source["encoder"]).split(pairs)
    else:
        if source["kind"] != "synthetic":
            raise ValueError("--synthetic-user needs a reward model trained with --synthetic")
        task = synthetic.make_task(num_criteria=source["criteria"], seed=source["task_seed"])
        truth = synthetic.sample_users(task, synthetic_user + 1, seed=1234)[synthetic_user]
        p = synthetic.user_pairs(task, truth, pairs, seed=10 + synthetic_user)
        q = synthetic.user_pairs(task, truth, 500, seed=20_000 + synthetic_user)
        few = RewardData(p.prompt, p.chosen, p.rejected, None)
        held = RewardData(q.prompt, q.chosen, q.rejected, None)
    weights = adapt(model, few.prompt, few.chosen, few.rejected, method=method, eta=eta)
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
