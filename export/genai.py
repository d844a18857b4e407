"""GenaiCausalLM: generation from a folder written by export_causal_lm + genai_config.json
(export_folder) on onnxruntime-genai, the ecosystem's C++ generate loop (KV cache, search,
sampling), with the steering inputs fed through generator.set_model_input: group_bias
(1 or B, G) and, for a steerable adapter, preference_weights (1 or B, G) (the mix, zeros for
none), both required inputs of such a folder's graph.

    lm = GenaiCausalLM("deploy/pmol")                  # CUDA when onnxruntime-genai-cuda sees a GPU
    lm.generate([[1, 52, 7]], max_new_tokens=32, steer={"safe": 2.0})       # -> list of id lists
    lm.generate([[1, 52, 7]], mix={"concise": 0.3, "verbose": 0.7})         # steerable adapters
    for ids in lm.stream([1, 52, 7], max_new_tokens=32): ...                  # one row, token by token

The same decoding options as OrtCausalLM.generate: greedy unless do_sample (temperature,
top_k (0: off), top_p, seed); stops at the model's EOS or after max_new_tokens.
"""
from __future__ import annotations

import json
import os
from typing import Iterator, Optional

import numpy as np

from .causal_lm import GROUP_BIAS, PREFERENCE_WEIGHTS
from .generate import _check_options, steering_inputs
from .genai_config import CONFIG_NAME, steering_defaults


def genai_available() -> bool:
    """Whether onnxruntime-genai (or its CUDA build) can be imported."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False
    return True


def _graph_facts(path: str) -> tuple[dict[str, str], list[str]]:
    """(the graph's metadata (moe_ext.*), its steering inputs with a default), read without
    its external weights."""
    import onnx

    proto = onnx.load(path, load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}, steering_defaults(proto)


class GenaiCausalLM:
    """An onnxruntime-genai model over `folder` (genai_config.json + the graph + tokenizer
    files). provider: None (CUDA when this onnxruntime-genai build has it, else CPU),
    "cpu" or "cuda". `provider` afterwards says which one runs."""

    def __init__(self, folder: str, provider: Optional[str] = None):
        import onnxruntime_genai as og

        config_path = os.path.join(folder, CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{folder!r}: no {CONFIG_NAME} (write the folder with "
                                    f"`moe-ext export --adapter ... --output FOLDER`)")
        with open(config_path) as f:
            config_json = json.load(f)
        decoder = config_json["model"]["decoder"]
        self.context_length = int(config_json["model"]["context_length"])
        self.folder, self.path = folder, os.path.join(folder, decoder["filename"])
        meta, defaulted = _graph_facts(self.path)
        if defaulted:
            raise ValueError(f"{self.path}: {' and '.join(defaulted)} has a default value, which "
                             f"onnxruntime-genai keeps whatever set_model_input says; re-export "
                             f"the folder with `moe-ext export` / export_folder")
        self.groups: list[str] = json.loads(meta.get("moe_ext.groups", "[]"))
        self.steerable = json.loads(meta.get("moe_ext.steerable", "false"))
        self.eos_token_id = json.loads(meta.get("moe_ext.eos_token_id", "null"))
        self.vocab_size = int(meta["moe_ext.vocab_size"])
        if provider not in (None, "cpu", "cuda"):
            raise ValueError(f"provider must be None, 'cpu' or 'cuda', got {provider!r}")
        cuda = og.is_cuda_available() if provider is None else provider == "cuda"
        if cuda and not og.is_cuda_available():
            raise ValueError("provider 'cuda': this onnxruntime-genai has no CUDA "
                             "(pip install 'moe_ext[onnx-gpu]')")
        config = og.Config(folder)
        config.clear_providers()
        if cuda:
            config.append_provider("cuda")
        self.provider = "cuda" if cuda else "cpu"
        try:
            self.model = og.Model(config)
        except Exception as err:  # og raises RuntimeError / its own errors for bad folders
            raise ValueError(f"{folder}: onnxruntime-genai cannot load it ({err})") from None

    def tokenizer(self):
        """onnxruntime-genai's own tokenizer for the folder's tokenizer files."""
        import onnxruntime_genai as og

        return og.Tokenizer(self.model)

    def _generator(self, rows: list[list[int]], max_new_tokens: int, do_sample: bool,
                   temperature: float, top_k: int, top_p: float, seed: Optional[int],
                   bias: Optional[np.ndarray], weights: Optional[np.ndarray]):
        """(an og.Generator with the prompt appended, the steering arrays it reads) for rows of
        equal length and steering_inputs' (group_bias, preference_weights)."""
        import onnxruntime_genai as og

        if len({len(r) for r in rows}) > 1:
            raise ValueError("input_ids: rows of one onnxruntime-genai batch must have equal lengths")
        length = len(rows[0])
        if length + max_new_tokens > self.context_length:
            raise ValueError(f"prompt of {length} tokens + max_new_tokens {max_new_tokens} exceeds "
                             f"the model's context length {self.context_length}")
        params = og.GeneratorParams(self.model)
        options = {"max_length": length + max_new_tokens, "batch_size": len(rows),
                   "do_sample": bool(do_sample)}
        if do_sample:
            # top_k 0 (off) is every token: genai's search option has no "off" value
            options.update(temperature=float(temperature), top_k=int(top_k) or self.vocab_size,
                           top_p=float(top_p))
            if seed is not None:
                options["random_seed"] = int(seed)
        params.set_search_options(**options)
        generator = og.Generator(self.model, params)
        keep = []
        # required inputs in export_folder's graphs: zeros = no steering, no mix
        for name, given, wanted in ((GROUP_BIAS, bias, bool(self.groups)),
                                    (PREFERENCE_WEIGHTS, weights, self.steerable)):
            if wanted:
                value = np.zeros((1, len(self.groups)), np.float32) if given is None else given
                # genai reads this array's memory at every step without copying it: the caller
                # keeps it alive as long as the generator (else later steps read freed memory)
                keep.append(np.ascontiguousarray(value, np.float32))
                generator.set_model_input(name, keep[-1])
        generator.append_tokens(np.asarray(rows, np.int32))
        return generator, keep

    def _steering(self, rows, max_new_tokens, do_sample, temperature, top_k, top_p, steer, mix):
        """Checks the prompt rows and options; steering_inputs' (group_bias,
        preference_weights) for them."""
        _check_options(max_new_tokens, do_sample, temperature, top_k, top_p)
        if not rows or any(not isinstance(r, (list, tuple, np.ndarray)) or len(r) == 0 for r in rows):
            raise ValueError("input_ids must be a non-empty list of non-empty token id lists")
        return steering_inputs(self.groups, self.steerable, steer, mix, len(rows))

    def generate(self, input_ids, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 50, top_p: float = 1.0,
                 seed: Optional[int] = None, steer=None, mix=None) -> list[list[int]]:
        """input_ids: token id lists (one per row, any lengths; rows of equal length run as
        one batch) -> each row's prompt + new tokens (EOS included, nothing after it).
        steer: {group: bias} or one dict per row. mix: for a steerable adapter, the
        preference mix {group: weight >= 0} (normalised) or one dict per row; not with steer."""
        rows = [list(map(int, r)) for r in input_ids]
        bias, weights = self._steering(rows, max_new_tokens, do_sample, temperature, top_k,
                                       top_p, steer, mix)
        search = (max_new_tokens, do_sample, temperature, top_k, top_p, seed)
        if len({len(r) for r in rows}) > 1:
            # rows of different lengths one at a time: onnxruntime-genai 0.18's left-padded
            # batches gave other tokens than transformers (and than each row alone) for the
            # padded rows of this decoder graph, so no padding is handed to it
            def row_of(a, i):
                return None if a is None else a[i % a.shape[0]][None]

            return [self._run([r], search, row_of(bias, i), row_of(weights, i))[0]
                    for i, r in enumerate(rows)]
        return self._run(rows, search, bias, weights)

    def _run(self, rows, search, bias, weights) -> list[list[int]]:
        """generate for rows of equal length; search: _generator's decoding arguments."""
        generator, _keep = self._generator(rows, *search, bias, weights)
        while not generator.is_done():
            generator.generate_next_token()
        out = []
        for i, r in enumerate(rows):
            new = list(generator.get_sequence(i))[len(r):]
            out.append(r + self._until_eos(new))
        return out

    def _until_eos(self, new: list[int]) -> list[int]:
        eos = set(np.atleast_1d(self.eos_token_id).tolist()) if self.eos_token_id is not None else set()
        for i, t in enumerate(new):
            if int(t) in eos:
                return [int(x) for x in new[:i + 1]]
        return [int(x) for x in new]

    def stream(self, input_ids, max_new_tokens: int = 32, do_sample: bool = False,
               temperature: float = 1.0, top_k: int = 50, top_p: float = 1.0,
               seed: Optional[int] = None, steer=None, mix=None) -> Iterator[int]:
        """One prompt (a list of ids): yields each new token id as it is generated (the
        EOS too, then stops). steer, mix: as generate's."""
        rows = [list(map(int, input_ids))]
        bias, weights = self._steering(rows, max_new_tokens, do_sample, temperature, top_k,
                                       top_p, steer, mix)
        generator, _keep = self._generator(rows, max_new_tokens, do_sample, temperature, top_k,
                                           top_p, seed, bias, weights)
        eos = set(np.atleast_1d(self.eos_token_id).tolist()) if self.eos_token_id is not None else set()
        while not generator.is_done():
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            yield token
            if token in eos:
                return
