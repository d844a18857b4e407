"""OrtCausalLM: onnxruntime inference for graphs written by export_causal_lm.

    lm = OrtCausalLM("pmol.onnx")                      # CUDA provider if onnxruntime-gpu sees a GPU
    out = lm(input_ids, attention_mask)                # prefill: logits + the KV cache
    out = lm(next_ids, longer_mask, past_key_values=out.past_key_values)   # one decode step
    lm.generate(input_ids, attention_mask, max_new_tokens=32, steer={"safe": 2.0})
    lm.generate(input_ids, attention_mask, mix={"concise": 0.3, "verbose": 0.7})  # steerable

Steering inputs (export_causal_lm's module docstring): group_bias (1 or B, G) for steer,
preference_weights (1 or B, G) for a steerable adapter's mix; both default to zeros.

Every step runs through IO binding: the KV cache stays in onnxruntime values on the
provider's device (GPU memory with the CUDA provider) from one step to the next; only the
token ids, the mask and the logits cross to the host.
"""
from __future__ import annotations

import json
import os
from typing import NamedTuple, Optional, Union

import numpy as np
import torch

from .causal_lm import GROUP_BIAS, KIND, PREFERENCE_WEIGHTS, past_names
from .generate import generate_loop, mix_weights, steering_bias
from .ort import check_input, make_session

_FLOAT = {"float32": np.float32, "float16": np.float16}


class KVCache:
    """The KV cache between steps: key and value of each layer, (B, H, P, Dh) onnxruntime
    values on the session's device, tagged with the model that wrote them."""

    def __init__(self, values: list, owner: "OrtCausalLM"):
        self.values, self.owner = values, owner

    @property
    def batch(self) -> int:
        return self.values[0].shape()[0]

    @property
    def length(self) -> int:
        """P, the tokens cached so far (padding included)."""
        return self.values[0].shape()[2]

    def numpy(self) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
        """((key, value) per layer) as numpy arrays (copied to the host)."""
        arrays = [v.numpy() for v in self.values]
        return tuple(zip(arrays[0::2], arrays[1::2]))


class CausalLMStep(NamedTuple):
    logits: np.ndarray          # (B, S, V) or (B, 1, V) for graphs exported with logits="last"
    past_key_values: KVCache    # the cache including this step's tokens


def _array(value, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, (np.ndarray, list, tuple)):
        return np.asarray(value)
    raise ValueError(f"{name} must be a numpy array or torch tensor, got {type(value).__name__}")


def positions_from_mask(attention_mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """position_ids (B, S) of the last S tokens: count of real tokens before each one, 0 on
    padding (transformers' rule in generate)."""
    positions = np.cumsum(attention_mask, axis=-1) - 1
    positions[attention_mask == 0] = 0
    return positions[:, -new_tokens:].astype(np.int64)


class OrtCausalLM:
    """An onnxruntime session for a graph written by export_causal_lm.

    providers: None picks CUDA when onnxruntime-gpu sees a GPU, else the CPU provider.
    session_options: an onnxruntime.SessionOptions (graph optimisation level, threads).
    Metadata read from the graph: groups (steering, in the inputs' order), steerable (whether
    it takes a preference mix), cache layout, dtype, token ids."""

    def __init__(self, path: str, providers: Optional[list[str]] = None, session_options=None):
        self.path = path
        self.session = make_session(path, providers, session_options)
        self.providers = self.session.get_providers()
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        if self.metadata.get("moe_ext.kind") != KIND:
            raise ValueError(f"{path} is not a graph written by export_causal_lm (kind "
                             f"{self.metadata.get('moe_ext.kind')!r}, want {KIND!r}); use OrtModel")
        layout = json.loads(self.metadata["moe_ext.cache"])
        self.num_layers, self.num_kv_heads = layout["num_layers"], layout["num_kv_heads"]
        self.head_dim = layout["head_dim"]
        self.groups: list[str] = json.loads(self.metadata["moe_ext.groups"])
        # graphs written before preference_weights existed record no moe_ext.steerable
        self.steerable = json.loads(self.metadata.get("moe_ext.steerable", "false"))
        self.dtype = _FLOAT[self.metadata["moe_ext.dtype"]]
        self.vocab_size = int(self.metadata["moe_ext.vocab_size"])
        self.eos_token_id = json.loads(self.metadata["moe_ext.eos_token_id"])
        self.pad_token_id = json.loads(self.metadata["moe_ext.pad_token_id"])
        self.specs = {i.name: i for i in self.session.get_inputs()}
        # export_folder's graphs take group_bias (and preference_weights) without a default
        # (for onnxruntime-genai): zeros are fed when not steering
        self.required = [n for n in (GROUP_BIAS, PREFERENCE_WEIGHTS) if n in self.specs]
        self.required_group_bias = GROUP_BIAS in self.required
        self.specs.update({i.name: i for i in self.session.get_overridable_initializers()})
        self.past_names = past_names(self.num_layers)
        self.present_names = past_names(self.num_layers, "present")
        self.provider = self.providers[0]  # the provider that runs the graph
        self.device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        stat = os.stat(path)
        self.fingerprint = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)

    def empty_cache(self, batch: int) -> KVCache:
        """A cache of length 0 for `batch` rows (the prefill's past)."""
        import onnxruntime as ort

        shape = [batch, self.num_kv_heads, 0, self.head_dim]
        return KVCache([ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, self.device, 0)
                        for _ in self.past_names], self)

    def _cache(self, past, batch: int) -> KVCache:
        """past_key_values as a KVCache of this model, checked against its layout."""
        if past is None:
            return self.empty_cache(batch)
        if isinstance(past, KVCache):
            if past.owner is not self and past.owner.fingerprint != self.fingerprint:
                raise ValueError(f"past_key_values come from another model ({past.owner.path}), "
                                 f"not from {self.path}")
            values = past.values
        else:
            import onnxruntime as ort

            flat = [t for pair in past for t in pair] if isinstance(past, (list, tuple)) else None
            if not flat or len(flat) != len(self.past_names):
                raise ValueError(f"past_key_values must be a KVCache or {self.num_layers} (key, "
                                 f"value) pairs (this model has {self.num_layers} layers)")
            arrays = [_array(t, n) for t, n in zip(flat, self.past_names)]
            for name, a in zip(self.past_names, arrays):
                if a.dtype.kind != "f":
                    raise ValueError(f"{name} must be floating point, got {a.dtype}")
            values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a, self.dtype),
                                                       self.device, 0) for a in arrays]
        want = (batch, self.num_kv_heads, None, self.head_dim)
        for name, value in zip(self.past_names, values):
            shape = tuple(value.shape())
            if len(shape) != 4 or any(w is not None and w != s for w, s in zip(want, shape)):
                raise ValueError(f"{name} has shape {shape} but this model's cache is (batch="
                                 f"{batch}, heads={self.num_kv_heads}, past, head_dim="
                                 f"{self.head_dim}): a KV cache from another model or batch?")
            if shape[2] != values[0].shape()[2]:
                raise ValueError(f"{name} holds {shape[2]} past tokens, "
                                 f"{self.past_names[0]} {values[0].shape()[2]}")
        return KVCache(values, self)

    def group_bias(self, steer) -> Optional[np.ndarray]:
        """The group_bias input (1 or B, G) for `steer`: None, {group: bias} or one such dict
        per batch row; ValueError for unknown groups or a model without expert groups."""
        return steering_bias(self.groups, steer)

    def preference_weights(self, mix) -> Optional[np.ndarray]:
        """The preference_weights input (1 or B, G) for `mix`: None, {group: weight} or one
        such dict per batch row (see export.generate.mix_weights); ValueError naming `mix`."""
        return mix_weights(self.groups, self.steerable, mix)

    def _row_input(self, name: str, value, batch: int) -> np.ndarray:
        """A steering input (G,) or (1 or B, G) as float32 (1 or B, G); ValueError naming it."""
        if name not in self.specs:
            raise ValueError(f"{self.path} takes no {name} input (its adapter has no expert "
                             f"groups{'' if name == GROUP_BIAS else ' or is not steerable'})")
        rows = _array(value, name).astype(np.float32)
        rows = rows[None] if rows.ndim == 1 else rows
        G = len(self.groups)
        if rows.ndim != 2 or rows.shape[1] != G or rows.shape[0] not in (1, batch):
            raise ValueError(f"{name} must have shape ({G},) or (1 or {batch}, {G}) for groups "
                             f"{self.groups}, got {np.shape(value)}")
        return rows

    def __call__(self, input_ids, attention_mask=None, position_ids=None,
                 past_key_values: Union[KVCache, tuple, None] = None,
                 group_bias=None, preference_weights=None) -> CausalLMStep:
        """One forward step. input_ids (B, S) int; attention_mask (B, P + S) int (default all
        ones); position_ids (B, S) (default from the mask); past_key_values a KVCache from this
        model or (key, value) pairs (B, H, P, Dh), None for the prefill; group_bias (G,) or
        (1 or B, G) float, None for no steering; preference_weights (G,) or (1 or B, G) float,
        the mix per row as given (rows on the simplex, or zeros: no mix; see
        preference_weights()), None for no mix (steerable graphs only)."""
        ids = _array(input_ids, "input_ids")
        check_input("input_ids", ids, self.specs["input_ids"])
        B, S = ids.shape
        cache = self._cache(past_key_values, B)
        total = cache.length + S
        mask = np.ones((B, total), np.int64) if attention_mask is None else \
            _array(attention_mask, "attention_mask")
        check_input("attention_mask", mask, self.specs["attention_mask"])
        if mask.shape != (B, total):
            raise ValueError(f"attention_mask must have shape (batch, past + new tokens) = "
                             f"{(B, total)}, got {mask.shape}")
        positions = positions_from_mask(mask, S) if position_ids is None else \
            _array(position_ids, "position_ids")
        check_input("position_ids", positions, self.specs["position_ids"])
        if positions.shape != (B, S):
            raise ValueError(f"position_ids must have shape {(B, S)} like input_ids, got {positions.shape}")
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64),
                 "position_ids": positions.astype(np.int64)}
        for name, value in ((GROUP_BIAS, group_bias), (PREFERENCE_WEIGHTS, preference_weights)):
            if value is None and name in self.required:
                value = np.zeros((1, len(self.groups)), np.float32)  # no steering, no mix
            if value is not None:
                feeds[name] = self._row_input(name, value, B)
        return self._run(feeds, cache)

    def _run(self, feeds: dict, cache: KVCache) -> CausalLMStep:
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, array in feeds.items():  # as values, which also binds the optional inputs
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(array), self.device, 0))
        for name, value in zip(self.past_names, cache.values):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")  # sampled on the host
        for name in self.present_names:
            binding.bind_output(name, self.device, 0)  # the cache stays on the device
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        logits = outputs[0].numpy().astype(np.float32, copy=False)
        return CausalLMStep(logits, KVCache(list(outputs[1:]), self))

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 50,
                 top_p: float = 1.0, seed: Optional[int] = None, eos_token_id=None,
                 pad_token_id: Optional[int] = None, steer=None, mix=None,
                 output_logits: bool = False, return_dict_in_generate: bool = False):
        """Like transformers' model.generate for decoder-only models: input_ids (B, S) with
        left padding marked by attention_mask -> sequences (B, S + new) (prompt included,
        pad_token_id after a row's EOS; stops when every row has ended or after
        max_new_tokens). Greedy unless do_sample (temperature, top_k (0: off), top_p, seed).
        eos_token_id (int or list) and pad_token_id default to the exported model's.
        steer: {group: bias} (moe_ext.set_group_bias's argument), or one dict per row.
        mix: for a steerable graph, the preference mix {group: weight >= 0} (normalised,
        groups left out weigh 0; moe_ext.preference_mix's argument), or one dict per row
        (None for a row without a mix); not with steer.
        Returns numpy, or torch when input_ids is a torch tensor; with
        return_dict_in_generate, a GenerateOutput (sequences, logits: per new token the
        raw (B, V) float32 logits when output_logits)."""
        return generate_loop(
            self, input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
            eos_token_id=self.eos_token_id if eos_token_id is None else eos_token_id,
            pad_token_id=pad_token_id, steer=steer, mix=mix, output_logits=output_logits,
            return_dict_in_generate=return_dict_in_generate)
