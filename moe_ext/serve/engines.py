"""What `moe-ext serve` (and `moe-ext generate --onnx`) runs: TextEngine, text from an
exported folder on onnxruntime-genai or, where it is not installed, on OrtCausalLM; and
RewardEngine, rewards and expert margins from a train-rm folder (PyTorch).

Both are safe to call from many threads: the onnxruntime sessions and the genai model are
(each request has its own generator / IO binding); the Hugging Face tokenizer is behind a
lock, and the reward model runs on one thread of its own (see RewardEngine)."""
from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..data import encode_prompt
from ..hf.models import load_tokenizer
from ..reward.adapt import METHODS, adapt_weights, expert_margins, head_inputs
from ..reward.backbone import BackboneRewardModel
from ..reward.embed import embed
from ..reward.job import INFO_NAME
from ..reward.saving import load_reward_model
from ..utils.io import read_json

RUNTIMES = ("auto", "genai", "ort")


def resolve_export(path: str) -> tuple[str, str]:
    """(folder, .onnx graph) for an exported folder (genai_config.json names the graph,
    else model.onnx) or a .onnx file; FileNotFoundError naming the path."""
    from ..export.genai_config import CONFIG_NAME, MODEL_NAME

    if os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path)), path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r}: no such exported folder or .onnx file")
    config = os.path.join(path, CONFIG_NAME)
    name = MODEL_NAME
    if os.path.isfile(config):
        with open(config) as f:
            name = json.load(f)["model"]["decoder"]["filename"]
    graph = os.path.join(path, name)
    if not os.path.isfile(graph):
        raise FileNotFoundError(f"{path!r}: no {name} in the folder (write it with "
                                f"`moe-ext export --adapter DIR --output {path}`)")
    return path, graph


class TextEngine:
    """Text generation from an exported folder (or .onnx file with its tokenizer beside it).

    runtime: "auto" (onnxruntime-genai when it is installed and the folder has
    genai_config.json, else onnxruntime with moe_ext's loop), "genai" or "ort".
    provider: None (CUDA when present), or an onnxruntime provider name / genai's "cpu" /
    "cuda". After loading, `runtime` and `provider` say what runs."""

    def __init__(self, path: str, runtime: str = "auto", provider: Optional[str] = None,
                 tokenizer=None):
        from ..export.genai import GenaiCausalLM, genai_available
        from ..export.genai_config import CONFIG_NAME

        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        folder, graph = resolve_export(path)
        has_config = os.path.isfile(os.path.join(folder, CONFIG_NAME))
        if runtime == "genai" and not genai_available():
            raise ValueError("runtime 'genai': onnxruntime-genai is not installed "
                             "(pip install 'moe_ext[onnx]')")
        if runtime == "genai" and not has_config:
            raise ValueError(f"runtime 'genai': {folder!r} has no {CONFIG_NAME}; re-export "
                             f"it with `moe-ext export --adapter DIR --output FOLDER`")
        if runtime == "auto":
            runtime = "genai" if has_config and genai_available() else "ort"
        self.folder, self.graph, self.runtime = folder, graph, runtime
        # a tokenizer object, or a hub id / folder to load it from (default: the export's)
        self.tokenizer = (load_tokenizer(tokenizer or folder)
                          if tokenizer is None or isinstance(tokenizer, str) else tokenizer)
        self._tokenizer_lock = threading.Lock()  # HF fast tokenizers: one thread at a time
        if runtime == "genai":
            if provider not in (None, "cpu", "cuda", "CPUExecutionProvider", "CUDAExecutionProvider"):
                raise ValueError(f"provider {provider!r}: onnxruntime-genai takes cpu or cuda")
            short = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda"}.get(provider, provider)
            self.lm = GenaiCausalLM(folder, short)
            self.provider = self.lm.provider
        else:
            from ..export import OrtCausalLM

            long = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}.get(provider, provider)
            self.lm = OrtCausalLM(graph, [long] if long else None)
            self.provider = self.lm.providers[0]
        self.groups: list[str] = list(self.lm.groups)
        self.vocab_size = len(self.tokenizer)
        self.eos_token_id = self.tokenizer.eos_token_id

    def encode(self, prompt, chat_template: bool = True) -> list[int]:
        with self._tokenizer_lock:
            return list(encode_prompt(self.tokenizer, prompt, chat_template))

    def decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def check_steer(self, steer: Optional[dict], mix: Optional[dict] = None) -> None:
        """ValueError for an unknown group, a bad mix, a mix for a graph that is not steerable
        or a mix with a steer (before a stream starts)."""
        from ..export.generate import steering_inputs

        steering_inputs(self.groups, self.lm.steerable, steer or None, mix, 1)

    def tokens(self, ids: list[int], options, steer: Optional[dict] = None,
               mix: Optional[dict] = None) -> Iterator[int]:
        """Yields the new token ids after the prompt `ids`, one at a time (the EOS, if
        reached, last). options: a moe_ext.pmol.GenerationOptions; steer {group: bias} or
        mix {group: weight} (a steerable graph's preference mix)."""
        steer = steer or None
        if self.runtime == "genai":
            top_k = options.top_k or 0  # 0: off
            yield from self.lm.stream(ids, max_new_tokens=options.max_new_tokens,
                                      do_sample=options.do_sample, temperature=options.temperature,
                                      top_k=top_k,
                                      top_p=options.top_p if options.top_p is not None else 1.0,
                                      seed=options.seed, steer=steer, mix=mix)
            return
        from ..export.generate import generate_steps, prepare

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_token_id
        arrays = prepare(self.lm, np.asarray([ids], np.int64), None, options.max_new_tokens,
                         options.do_sample, options.temperature, options.top_k or 0,
                         options.top_p if options.top_p is not None else 1.0,
                         self.eos_token_id, pad, steer, mix)
        ids_a, mask, eos, pad, bias, weights = arrays
        for new, _ in generate_steps(self.lm, ids_a, mask, max_new_tokens=options.max_new_tokens,
                                     do_sample=options.do_sample, temperature=options.temperature,
                                     top_k=options.top_k or 0,
                                     top_p=options.top_p if options.top_p is not None else 1.0,
                                     seed=options.seed, eos=eos, pad=pad, bias=bias,
                                     weights=weights):
            yield int(new[0])

    def generate(self, prompt, options, steer: Optional[dict] = None,
                 mix: Optional[dict] = None) -> dict:
        """{"text", "new_tokens"} for `prompt` (string or messages)."""
        ids = self.encode(prompt, options.chat_template)
        new = list(self.tokens(ids, options, steer, mix))
        return {"text": self.decode(new).strip(), "new_tokens": len(new)}

    def stream(self, prompt, options, steer: Optional[dict] = None,
               mix: Optional[dict] = None) -> Iterator[str]:
        """Yields the text as it grows, in pieces (a piece is held back while it ends in
        an incomplete UTF-8 character; what is still held at the end is sent as decoded,
        so the pieces add up to generate's text)."""
        ids = self.encode(prompt, options.chat_template)
        new, sent, text = [], "", ""
        for token in self.tokens(ids, options, steer, mix):
            new.append(token)
            text = self.decode(new)
            if text.endswith("\ufffd"):
                continue
            if len(text) > len(sent) and text.startswith(sent):
                yield text[len(sent):]
                sent = text
        if len(text) > len(sent) and text.startswith(sent):  # ended inside a character
            yield text[len(sent):]


class RewardEngine:
    """Rewards and expert margins from a reward model folder written by train-rm (text
    through its encoder, or a backbone model on the strings)."""

    def __init__(self, directory: str):
        self.model = load_reward_model(directory)
        info_path = os.path.join(directory, INFO_NAME)
        source = read_json(info_path).get("source", {}) if os.path.isfile(info_path) else {}
        self.encoder = None
        if not isinstance(self.model, BackboneRewardModel):
            self.encoder = source.get("encoder")
            if self.encoder is None:
                raise ValueError(f"--reward-model {directory!r} was trained on embeddings without "
                                 f"a text encoder (synthetic data); serving needs a model trained "
                                 f"on text (--data) or a --backbone model")
        self.num_experts = int(self.model.num_experts)
        # The model runs on one thread of its own, whichever thread asks: torch calls from
        # the server's pool of worker threads took 24 to 70 ms each for a 0.3 ms forward
        # here (OpenMP teams per calling thread on 2 busy cores); on one thread, 0.5 ms.
        # It also serialises the model, whose embed toggles eval mode.
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="moe-ext-reward")

    def _inputs(self, prompts: list[str], first: list[str], second: list[str]):
        """(head, prompt, first, second embeddings) for lists of strings."""
        if self.encoder is None:
            return head_inputs(self.model, prompts, first, second)
        return (self.model, embed(prompts, self.encoder), embed(first, self.encoder),
                embed(second, self.encoder))

    def score(self, prompt: str, responses: list[str], weights: Optional[list[float]]) -> list[float]:
        """Rewards (n,) of the responses to `prompt`: mixed by `weights` (E,) (a user's
        profile) or, when None, by the model's router."""
        return self._worker.submit(self._score, prompt, responses, weights).result()

    def margins(self, prompt: str, chosen: str, rejected: str) -> list[float]:
        """(E,) every expert's reward margin chosen - rejected for one labelled pair."""
        return self._worker.submit(self._margins, prompt, chosen, rejected).result()

    @torch.no_grad()
    def _score(self, prompt, responses, weights):
        head, p, r, _ = self._inputs([prompt] * len(responses), responses, responses)
        u = None if weights is None else torch.tensor(weights, dtype=torch.float32)
        return head(p, r, u).float().tolist()

    @torch.no_grad()
    def _margins(self, prompt, chosen, rejected):
        head, _, c, r = self._inputs([prompt], [chosen], [rejected])
        return expert_margins(head, c, r)[0].tolist()


def feedback_update(method: str, eta: float):
    """The profile update of a feedback (moe_ext.serve.profiles.Update): hedge applies one
    online multiplicative step to the stored weights (from uniform for a new user), which
    is the order-free product of the pairs' factors; hyre and gradient refit on all the
    user's pairs (moe_ext.reward.adapt_weights, as `moe-ext adapt`)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not eta > 0:
        raise ValueError(f"eta must be > 0, got {eta!r}")

    def update(previous, history):
        margins = torch.tensor(history, dtype=torch.float32)
        if method == "hedge":
            E = margins.shape[1]
            start = torch.full((E,), 1.0 / E) if previous is None else torch.tensor(previous)
            # u_e <- u_e * exp(-eta * BT loss), the loss being -log sigmoid(margin_e)
            log_u = torch.log(start.clamp_min(1e-30)) + eta * F.logsigmoid(margins[-1])
            return torch.softmax(log_u, -1).tolist()
        return adapt_weights(margins, method, eta=eta).tolist()

    return update
