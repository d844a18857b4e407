"""Sparse mixture-of-experts reward model for personalised preferences (after arXiv
2606.04284), on moe_ext's routing kernel.

Embedding mode: inputs are prompt and response embeddings from a frozen encoder. A router on
the prompt embedding picks top_k of E experts; each expert is a reward head on the response
embedding; the reward is the router-weighted mix of the chosen experts' rewards:

    r(x, y) = sum_{k<K} w_k(x) * r_{e_k}(y),   w = renormalised top-K of softmax(router(x))

Trained on binary preference pairs (Bradley-Terry) with local sparsity (low routing entropy
per sample), global balance (even expert use over the data) and expert diversity (experts'
margins not redundant). At test time a user's few labelled pairs re-weight the experts
(`adapt`: Hedge, i.e. multiplicative weights on each expert's pairwise loss, or a gradient
step on routing logits); the user's weights minus the model's average routing is their
interpretable profile.

Shapes: prompt_emb (B, P), response_emb (B, Dr), rewards (B,), routing probs (B, E),
user_weights (E,) or (B, E).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops


class SparseMoERewardModel(nn.Module):
    """Router nn.Linear(prompt_dim, E); experts are linear heads on the response embedding
    (expert_hidden=None) or one-hidden-layer MLPs (expert_hidden=H), all E batched."""

    def __init__(self, prompt_dim: int, response_dim: int, num_experts: int, top_k: int = 1,
                 expert_hidden: Optional[int] = None, router_temperature: float = 1.0):
        super().__init__()
        for name, value in (("prompt_dim", prompt_dim), ("response_dim", response_dim),
                            ("num_experts", num_experts)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if router_temperature <= 0:
            raise ValueError(f"router_temperature must be > 0, got {router_temperature}")
        self.prompt_dim, self.response_dim = prompt_dim, response_dim
        self.num_experts, self.top_k = num_experts, top_k
        self.expert_hidden, self.router_temperature = expert_hidden, router_temperature
        self.router = nn.Linear(prompt_dim, num_experts)
        E = num_experts
        if expert_hidden is None:
            self.head_w = nn.Parameter(torch.randn(E, response_dim) / math.sqrt(response_dim))
            self.head_b = nn.Parameter(torch.zeros(E))
        else:
            self.hidden_w = nn.Parameter(torch.randn(E, expert_hidden, response_dim)
                                         / math.sqrt(response_dim))
            self.hidden_b = nn.Parameter(torch.zeros(E, expert_hidden))
            self.head_w = nn.Parameter(torch.randn(E, expert_hidden) / math.sqrt(expert_hidden))
            self.head_b = nn.Parameter(torch.zeros(E))
        with torch.no_grad():
            self.router.weight.normal_(0, 0.02)
            self.router.bias.zero_()

    def config(self) -> dict:
        return {"prompt_dim": self.prompt_dim, "response_dim": self.response_dim,
                "num_experts": self.num_experts, "top_k": self.top_k,
                "expert_hidden": self.expert_hidden, "router_temperature": self.router_temperature}

    def _check(self, name: str, t: torch.Tensor, dim: int):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] != dim:
            raise ValueError(f"{name} must have shape (B, {dim}), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")

    def router_logits(self, prompt_emb: torch.Tensor) -> torch.Tensor:
        self._check("prompt_emb", prompt_emb, self.prompt_dim)
        return self.router(prompt_emb)

    def route(self, prompt_emb: torch.Tensor) -> torch.Tensor:
        """(B, E) routing probabilities (softmax over all experts, before top-K)."""
        return torch.softmax(self.router_logits(prompt_emb).float() / self.router_temperature, -1)

    def expert_rewards(self, response_emb: torch.Tensor) -> torch.Tensor:
        """(B, E): every expert's reward for each response."""
        self._check("response_emb", response_emb, self.response_dim)
        if self.expert_hidden is None:
            return response_emb @ self.head_w.T + self.head_b
        h = torch.einsum("bd,ehd->beh", response_emb, self.hidden_w) + self.hidden_b
        return (F.gelu(h) * self.head_w).sum(-1) + self.head_b

    def gates(self, prompt_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(dense gates (B, E): the renormalised top-K weights scattered, zeros elsewhere;
        routing probs (B, E)). Uses moe_ext's routing kernel (top-K with gradient)."""
        r = ops.route(self.router_logits(prompt_emb), self.top_k, self.router_temperature)
        dense = torch.zeros_like(r.probs).scatter(1, r.experts, r.weights)
        return dense, r.probs

    def forward(self, prompt_emb: torch.Tensor, response_emb: torch.Tensor,
                user_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rewards (B,). With user_weights ((E,) or (B, E), e.g. from `adapt`) those replace
        the router's weights."""
        rewards = self.expert_rewards(response_emb)
        if user_weights is not None:
            u = user_weights.to(rewards.dtype)
            if u.shape[-1] != self.num_experts:
                raise ValueError(f"user_weights must have {self.num_experts} entries per row, "
                                 f"got shape {tuple(u.shape)}")
            return (rewards * u).sum(-1)
        self._check("prompt_emb", prompt_emb, self.prompt_dim)
        gates, _ = self.gates(prompt_emb)
        return (rewards * gates.to(rewards.dtype)).sum(-1)


class UniversalRewardModel(nn.Module):
    """Baseline: one Bradley-Terry reward head on the response embedding, for every user."""

    def __init__(self, response_dim: int, hidden: Optional[int] = None):
        super().__init__()
        self.net = (nn.Linear(response_dim, 1) if hidden is None else
                    nn.Sequential(nn.Linear(response_dim, hidden), nn.GELU(), nn.Linear(hidden, 1)))

    def forward(self, prompt_emb, response_emb, user_weights=None) -> torch.Tensor:
        return self.net(response_emb).squeeze(-1)


# ---------------------------------------------------------------- training
@dataclass
class FitConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-2
    weight_decay: float = 0.0
    objective: str = "mixture"   # "mixture": mixture of per-expert BT likelihoods;
                                 # "mixed_reward": BT on the mixed reward
    sparsity_coef: float = 0.05  # mean routing entropy per sample (low = confident routing)
    balance_coef: float = 0.1    # log E - entropy of the mean routing (even use overall)
    diversity_coef: float = 0.05 # squared correlation between experts' margins
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.objective not in ("mixture", "mixed_reward"):
            raise ValueError(f"FitConfig.objective must be 'mixture' or 'mixed_reward', "
                             f"got {self.objective!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"FitConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("sparsity_coef", "balance_coef", "diversity_coef", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"FitConfig.{name} must be >= 0, got {getattr(self, name)}")


def _check_pairs(prompt_emb, chosen_emb, rejected_emb):
    for name, t in (("prompt_emb", prompt_emb), ("chosen_emb", chosen_emb),
                    ("rejected_emb", rejected_emb)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor (B, dim)")
    if not (prompt_emb.shape[0] == chosen_emb.shape[0] == rejected_emb.shape[0]):
        raise ValueError(f"prompt_emb, chosen_emb and rejected_emb must have the same number of "
                         f"rows, got {prompt_emb.shape[0]}, {chosen_emb.shape[0]}, "
                         f"{rejected_emb.shape[0]}")
    if chosen_emb.shape != rejected_emb.shape:
        raise ValueError(f"chosen_emb shape {tuple(chosen_emb.shape)} must equal rejected_emb "
                         f"shape {tuple(rejected_emb.shape)}")


def moe_loss(model: SparseMoERewardModel, prompt, chosen, rejected, cfg: FitConfig):
    """(total loss, metrics) for one batch of pairs."""
    margins = model.expert_rewards(chosen) - model.expert_rewards(rejected)  # (B, E)
    gates, probs = model.gates(prompt)
    if cfg.objective == "mixture":
        bt = -torch.log((gates * torch.sigmoid(margins)).sum(-1).clamp_min(1e-9)).mean()
    else:
        bt = -F.logsigmoid((gates * margins).sum(-1)).mean()
    E = probs.shape[1]
    entropy = -(probs * torch.log(probs.clamp_min(1e-9))).sum(-1).mean()
    mean_p = probs.mean(0)
    balance = math.log(E) + (mean_p * torch.log(mean_p.clamp_min(1e-9))).sum()
    diversity = margins.new_zeros(())
    if E > 1 and margins.shape[0] > 1:
        m = margins - margins.mean(0)
        m = m / m.norm(dim=0).clamp_min(1e-6)
        corr = m.T @ m
        diversity = (corr - torch.diag(torch.diag(corr))).square().sum() / (E * (E - 1))
    total = (bt + cfg.sparsity_coef * entropy + cfg.balance_coef * balance
             + cfg.diversity_coef * diversity)
    return total, {"bt": bt.item(), "entropy": entropy.item(), "balance": balance.item(),
                   "diversity": diversity.item()}


def fit(model: nn.Module, prompt_emb: torch.Tensor, chosen_emb: torch.Tensor,
        rejected_emb: torch.Tensor, config: Optional[FitConfig] = None, **options) -> list[dict]:
    """Trains `model` (SparseMoERewardModel or UniversalRewardModel) on preference pairs;
    options override FitConfig fields. Returns one metrics row per epoch."""
    cfg = config or FitConfig()
    if options:
        cfg = FitConfig(**{**cfg.__dict__, **options})
    _check_pairs(prompt_emb, chosen_emb, rejected_emb)
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = prompt_emb.shape[0]
    history = []
    for epoch in tqdm(range(cfg.epochs), desc="fit", disable=not cfg.progress):
        perm = torch.randperm(n, generator=gen)
        totals: dict[str, float] = {}
        batches = 0
        for i in range(0, n, cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            p, c, r = prompt_emb[idx], chosen_emb[idx], rejected_emb[idx]
            if isinstance(model, SparseMoERewardModel):
                loss, metrics = moe_loss(model, p, c, r, cfg)
            else:
                loss = -F.logsigmoid(model(p, c) - model(p, r)).mean()
                metrics = {"bt": loss.item()}
            opt.zero_grad()
            loss.backward()
            opt.step()
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v
            batches += 1
        history.append({"epoch": epoch + 1, **{k: v / batches for k, v in totals.items()}})
    return history


# ---------------------------------------------------------------- personalisation
@torch.no_grad()
def average_routing(model: SparseMoERewardModel, prompt_emb: torch.Tensor) -> torch.Tensor:
    """(E,) the model's mean sparse gates over these prompts: the prior a user starts from."""
    gates, _ = model.gates(prompt_emb)
    return gates.mean(0)


def adapt(model: SparseMoERewardModel, prompt_emb: torch.Tensor, chosen_emb: torch.Tensor,
          rejected_emb: torch.Tensor, method: str = "hedge", eta: float = 0.1, passes: int = 1,
          steps: int = 100, lr: float = 0.1, prior: str = "uniform") -> torch.Tensor:
    """A user's weights over the experts (E,) (a probability vector) from their few pairs.

    hedge:    multiplicative weights: u_e <- u_e * exp(-eta * BT loss of expert e on a pair),
              over the pairs `passes` times, renormalised. Hedge tracks the best single
              expert; with a small eta it keeps a mixture.
    gradient: routing logits z (E,) tuned by Adam for `steps` on the BT loss of the reward
              mixed with softmax(z), starting from the prior.
    prior:    "uniform" or "routing" (the model's average routing on these prompts).
    """
    if method not in ("hedge", "gradient"):
        raise ValueError(f"method must be 'hedge' or 'gradient', got {method!r}")
    if prior not in ("uniform", "routing"):
        raise ValueError(f"prior must be 'uniform' or 'routing', got {prior!r}")
    _check_pairs(prompt_emb, chosen_emb, rejected_emb)
    if prompt_emb.shape[0] == 0:
        raise ValueError("adapt needs at least one labelled pair")
    E = model.num_experts
    with torch.no_grad():
        margins = model.expert_rewards(chosen_emb) - model.expert_rewards(rejected_emb)  # (n, E)
        start = (torch.full((E,), 1.0 / E) if prior == "uniform"
                 else average_routing(model, prompt_emb).float().clamp_min(1e-3))
        start = start / start.sum()
    if method == "hedge":
        log_u = torch.log(start)
        losses = -F.logsigmoid(margins.float())  # (n, E) each expert's pairwise loss
        for _ in range(passes):
            for i in range(losses.shape[0]):
                log_u = log_u - eta * losses[i]
                log_u = log_u - torch.logsumexp(log_u, 0)
        return log_u.exp()
    z = torch.log(start).clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    for _ in range(steps):
        loss = -F.logsigmoid((margins.float() * torch.softmax(z, 0)).sum(-1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.softmax(z.detach(), 0)


@torch.no_grad()
def pairwise_accuracy(model: nn.Module, prompt_emb: torch.Tensor, chosen_emb: torch.Tensor,
                      rejected_emb: torch.Tensor, user_weights: Optional[torch.Tensor] = None) -> float:
    """Fraction of pairs where the chosen response gets the higher reward."""
    _check_pairs(prompt_emb, chosen_emb, rejected_emb)
    rc = model(prompt_emb, chosen_emb, user_weights)
    rr = model(prompt_emb, rejected_emb, user_weights)
    return (rc > rr).float().mean().item()


def purity_nmi(pred: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """Cluster purity (each predicted cluster counted as its majority category) and NMI
    (arithmetic normalisation) of predicted vs true labels (n,): how well the router's top
    expert recovers known categories."""
    n = len(truth)
    table = torch.zeros(int(truth.max()) + 1, int(pred.max()) + 1)
    table.index_put_((truth.long(), pred.long()), torch.ones(n), accumulate=True)
    purity = table.max(0).values.sum().item() / n
    p = table / n
    pt, pp = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    mi = (p[nz] * torch.log(p[nz] / (pt @ pp)[nz])).sum().item()

    def entropy(q):
        q = q[q > 0]
        return -(q * torch.log(q)).sum().item()

    denom = (entropy(pt) + entropy(pp)) / 2
    return purity, (mi / denom if denom > 0 else 1.0)


# ---------------------------------------------------------------- backbone mode
class BackboneRewardModel(nn.Module):
    """Backbone mode: an HF transformers encoder or decoder (optionally with MoLoRA layers
    inside, see moe_ext.get_molora_model) turns token ids into embeddings, trained end to
    end with the sparse MoE head. The prompt embedding is the pooled prompt; the response
    embedding is the pooled prompt + response sequence."""

    def __init__(self, backbone: nn.Module, num_experts: int, top_k: int = 1,
                 expert_hidden: Optional[int] = None, pooling: str = "mean"):
        super().__init__()
        if pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
        hidden = backbone.config.hidden_size
        self.backbone, self.pooling = backbone, pooling
        self.head = SparseMoERewardModel(hidden, hidden, num_experts, top_k, expert_hidden)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, S) ids and mask -> (B, hidden) pooled last hidden state."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                            output_hidden_states=True)
        hidden = out.hidden_states[-1]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "mean":
            return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        last = attention_mask.sum(1).clamp_min(1) - 1
        return hidden[torch.arange(hidden.shape[0]), last]

    def forward(self, prompt_ids, prompt_mask, sequence_ids, sequence_mask,
                user_weights: Optional[torch.Tensor] = None, rejected_ids=None,
                rejected_mask=None, fit_config: Optional[FitConfig] = None):
        """Rewards (B,) for prompts (B, Sp) and prompt + response sequences (B, S).
        Given rejected_ids/rejected_mask too (sequence_* being the chosen ones), returns the
        training loss and metrics of `moe_loss` instead, so that DDP sees one forward."""
        prompt = self.encode(prompt_ids, prompt_mask)
        seq = self.encode(sequence_ids, sequence_mask)
        if rejected_ids is None:
            return self.head(prompt, seq, user_weights)
        rejected = self.encode(rejected_ids, rejected_mask)
        return moe_loss(self.head, prompt, seq, rejected, fit_config or FitConfig())


def train_backbone_reward_model(model: BackboneRewardModel, batch_fn, train_config,
                                fit_config: Optional[FitConfig] = None):
    """End-to-end training with the shared loop (moe_ext.training: progress, atomic
    checkpoints, resume, DDP). batch_fn(step, micro, rank, world) returns a dict with
    prompt_ids, prompt_mask, chosen_ids, chosen_mask, rejected_ids, rejected_mask."""
    from .training import train

    cfg = fit_config or FitConfig()

    def loss_fn(wrapped, raw, b):
        return wrapped(b["prompt_ids"], b["prompt_mask"], b["chosen_ids"], b["chosen_mask"],
                       rejected_ids=b["rejected_ids"], rejected_mask=b["rejected_mask"],
                       fit_config=cfg)

    return train(model, batch_fn, loss_fn, train_config, describe="reward model")


# ---------------------------------------------------------------- checkpoints
def save_reward_model(model: SparseMoERewardModel, directory: str) -> None:
    """reward_config.json + reward_model.safetensors (atomic, no pickle)."""
    import json
    import os

    from safetensors.torch import save_file

    from .model import atomic_write

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(os.path.join(directory, "reward_model.safetensors"), lambda t: save_file(state, t))
    meta = {"format_version": 1, "class": type(model).__name__, "config": model.config()}
    atomic_write(os.path.join(directory, "reward_config.json"),
                 lambda t: open(t, "w").write(json.dumps(meta, indent=2)))


def load_reward_model(directory: str) -> SparseMoERewardModel:
    import json
    import os

    from safetensors.torch import load_file

    path = os.path.join(directory, "reward_config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no reward_config.json in {directory!r}")
    meta = json.load(open(path))
    if meta.get("format_version") != 1 or meta.get("class") != "SparseMoERewardModel":
        raise ValueError(f"{path}: not a moe_ext SparseMoERewardModel checkpoint (format 1)")
    model = SparseMoERewardModel(**meta["config"])
    model.load_state_dict(load_file(os.path.join(directory, "reward_model.safetensors")))
    return model
