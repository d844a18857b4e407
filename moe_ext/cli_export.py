"""`moe-ext export` and `moe-ext ort-run`."""
from __future__ import annotations

import json
import os

import torch

from .cli_util import fail as _fail


def cmd_export(args) -> int:
    """Export a saved PMoL adapter + base model, or a reward model, to ONNX."""
    from .export import to_onnx

    try:
        if args.reward_model:
            from . import reward

            model = reward.load_reward_model(args.reward_model)
            example = {"prompt_emb": torch.randn(2, model.prompt_dim),
                       "response_emb": torch.randn(2, model.response_dim)}
        else:
            if not args.adapter or not args.base:
                return _fail("export needs --reward-model DIR, or --adapter DIR with --base DIR")
            from transformers import AutoModelForCausalLM

            from .model import load_molora

            if not os.path.isdir(args.base):
                return _fail(f"base model folder not found: {args.base!r}")
            model = load_molora(AutoModelForCausalLM.from_pretrained(args.base).eval(), args.adapter)
            ids = torch.randint(0, model.config.vocab_size, (2, args.length))
            example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        path = to_onnx(model, args.output, example, dtype=args.dtype)
    except (OSError, ValueError) as err:
        return _fail(str(err))
    print(json.dumps({"output": path}) if args.json else f"wrote {path}")
    return 0


def cmd_ort_run(args) -> int:
    """Run an exported model on random inputs of the given batch and length."""
    import time

    import numpy as np

    from .export import OrtModel

    try:
        model = OrtModel(args.model, [args.provider] if args.provider else None)
    except (OSError, ValueError) as err:
        return _fail(str(err))
    rng = np.random.default_rng(0)
    vocab = int(model.metadata.get("moe_ext.vocab_size", "2"))
    inputs = {}
    for name, spec in model.inputs.items():
        shape = [d if isinstance(d, int) else (args.batch if i == 0 else args.length)
                 for i, d in enumerate(spec.shape)]
        if "int" in spec.type:
            inputs[name] = (np.ones(shape, np.int64) if "mask" in name
                            else rng.integers(0, vocab, shape, dtype=np.int64))
        else:
            dtype = np.float16 if "float16" in spec.type else np.float32
            inputs[name] = rng.standard_normal(shape).astype(dtype)
    outputs = model(**inputs)
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        model(**inputs)
        times.append((time.perf_counter() - t0) * 1e3)
    result = {"providers": model.providers, "inputs": {k: list(v.shape) for k, v in inputs.items()},
              "outputs": {k: list(v.shape) for k, v in outputs.items()},
              "median_ms": float(np.median(times)) if times else None,
              "kind": model.metadata.get("moe_ext.kind")}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.model}: {result['kind']} on {', '.join(model.providers)}")
        for k, v in result["outputs"].items():
            print(f"  output {k}: shape {tuple(v)}")
        if times:
            print(f"  median latency {result['median_ms']:.3f} ms over {args.repeat} runs")
    return 0
