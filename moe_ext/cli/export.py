"""`moe-ext export` and `moe-ext ort-run`."""
from __future__ import annotations

import os

import numpy as np
import torch

from ..molora import load_molora
from ..reward import load_reward_model
from ..utils.timing import time_call
from .common import (add_json, batch_int, check_exists, check_outside, check_writable, fail,
                     print_json, quiet_transformers, some_count_int, tokens_int)


def cmd_export(args) -> int:
    """Export a saved PMoL adapter + base model (generation graph with a KV cache, or a plain
    logits graph with --no-cache), or a reward model, to ONNX."""
    from ..export import to_onnx  # onnx is an optional extra
    from ..export.from_adapter import export_adapter, load_base, resolve_adapter, resolve_base
    from ..export.reward import reward_example_inputs

    quiet_transformers()
    result = {"output": args.output}
    try:
        # a generation graph goes into a folder (FOLDER/model.onnx + genai_config.json +
        # tokenizer) unless --output names a .onnx file; other graphs are one .onnx file
        to_folder = bool(args.adapter) and not args.no_cache and not args.output.endswith(".onnx")
        if not to_folder and not args.output.endswith(".onnx"):
            return fail(f"--output {args.output}: must name a .onnx file for this graph")
        check_writable(args.output, "--output", folder=to_folder)
        for option, path in (("--adapter", args.adapter), ("--reward-model", args.reward_model)):
            if path:
                check_exists(path, option)
        written = os.path.join(args.output, "model.onnx") if to_folder else args.output
        check_outside(written, "--output", {"--adapter": args.adapter, "--base": args.base,
                                            "--reward-model": args.reward_model})
        reward_only = [o for o, given in (("--adapter", args.adapter), ("--base", args.base),
                                          ("--no-cache", args.no_cache),
                                          ("--logits", args.logits is not None),
                                          ("--length", args.length is not None)) if given]
        if args.reward_model and reward_only:
            return fail(f"{', '.join(reward_only)}: not for --reward-model exports")
        if args.no_cache and args.logits is not None:
            return fail("--logits: not with --no-cache (its graph gives the logits of every position)")
        if not args.no_cache and args.length is not None:
            return fail("--length: only for --no-cache exports (the generation graph takes any length)")
        os.makedirs(args.output if to_folder else os.path.dirname(os.path.abspath(args.output)),
                    exist_ok=True)
        if args.reward_model:
            model = load_reward_model(args.reward_model)
            to_onnx(model, args.output, reward_example_inputs(model, args.personalized),
                    dtype=args.dtype)
        elif args.personalized:
            return fail("--personalized is for reward models (--reward-model DIR)")
        elif not args.adapter:
            return fail("export needs --reward-model DIR, or --adapter DIR [--base NAME_OR_PATH]")
        elif args.no_cache:
            adapter, artefact = resolve_adapter(args.adapter)
            model = load_molora(load_base(resolve_base(adapter, artefact, args.base)), adapter)
            ids = torch.randint(0, model.config.vocab_size, (2, args.length or 8))
            to_onnx(model, args.output, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                    dtype=args.dtype)
        else:
            result = export_adapter(args.adapter, args.output, base=args.base, dtype=args.dtype,
                                    logits=args.logits or "last")
    except (OSError, ValueError) as err:
        return fail(str(err))
    if args.json:
        print_json(result)
    else:
        print(f"wrote {result['output']}")
        if result.get("folder"):
            print(f"wrote genai_config.json to {result['folder']} (onnxruntime-genai loads the folder)")
        if result.get("tokenizer"):
            print(f"wrote the tokenizer to {result['tokenizer']}")
    return 0


def cmd_ort_run(args) -> int:
    """Run an exported model on random inputs of the given batch and length."""
    from ..export import OrtModel  # onnxruntime is an optional extra

    try:
        check_exists(args.model, "MODEL", folder=False)
        model = OrtModel(args.model, [args.provider] if args.provider else None)
    except (OSError, ValueError) as err:
        return fail(str(err))
    if model.metadata.get("moe_ext.kind") == "causal_lm_with_past":
        return _ort_run_prefill(args)
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
    outputs = model(**inputs)  # also the warm-up
    median = (time_call(lambda: model(**inputs), warmup=0, reps=args.repeat)["median_ms"]
              if args.repeat > 0 else None)
    result = {"providers": model.providers, "inputs": {k: list(v.shape) for k, v in inputs.items()},
              "outputs": {k: list(v.shape) for k, v in outputs.items()},
              "median_ms": median, "kind": model.metadata.get("moe_ext.kind")}
    if args.json:
        print_json(result)
    else:
        print(f"{args.model}: {result['kind']} on {', '.join(model.providers)}")
        for k, v in result["outputs"].items():
            print(f"  output {k}: shape {tuple(v)}")
        if median is not None:
            print(f"  median latency {result['median_ms']:.3f} ms over {args.repeat} runs")
    return 0


def _ort_run_prefill(args) -> int:
    """ort-run for a generation graph: a prefill of random ids (empty KV cache)."""
    from ..export import OrtCausalLM

    model = OrtCausalLM(args.model, [args.provider] if args.provider else None)
    ids = np.random.default_rng(0).integers(0, model.vocab_size, (args.batch, args.length))
    step = model(ids)  # also the warm-up
    median = (time_call(lambda: model(ids), warmup=0, reps=args.repeat)["median_ms"]
              if args.repeat > 0 else None)
    outputs = {"logits": list(step.logits.shape),
               "present": [args.batch, model.num_kv_heads, step.past_key_values.length, model.head_dim]}
    result = {"providers": model.providers, "inputs": {"input_ids": list(ids.shape)},
              "outputs": outputs, "median_ms": median, "kind": model.metadata["moe_ext.kind"],
              "groups": model.groups}
    if args.json:
        print_json(result)
    else:
        print(f"{args.model}: {result['kind']} on {', '.join(model.providers)}; steering "
              f"groups {model.groups or 'none'}")
        print(f"  prefill of {args.batch} x {args.length} tokens: logits {tuple(outputs['logits'])}, "
              f"KV cache {model.num_layers} layers x {tuple(outputs['present'])}")
        if median is not None:
            print(f"  median prefill latency {median:.3f} ms over {args.repeat} runs")
    return 0


def register(sub) -> None:
    ex = sub.add_parser(
        "export", help="export a PMoL model (adapter + base) or a reward model to ONNX",
        description="Export to ONNX with standard ops only (runs on any onnxruntime "
                    "execution provider), dynamic batch and sequence length. A PMoL model "
                    "becomes a generation graph: KV cache in and out, position ids, the "
                    "attention mask, the steering bias (group_bias) and, for a steerable "
                    "adapter, its preference mix (preference_weights) as inputs (zeros: no "
                    "steering, no mix); its folder also gets genai_config.json (onnxruntime-genai loads "
                    "it as it is) and the tokenizer.")
    ex.add_argument("--adapter", help="adapter folder (save_molora), or a train-pmol output folder")
    ex.add_argument("--base", help="base model: hub id or folder (default: the one the adapter "
                                   "records, or the train-pmol output's base_model)")
    ex.add_argument("--reward-model", help="reward model folder written by train-rm (either mode)")
    ex.add_argument("--personalized", action="store_true",
                    help="reward model: take a user_weights input (B, E) in place of the router")
    ex.add_argument("--output", required=True,
                    help="--adapter: the folder to write (model.onnx, genai_config.json, "
                         "tokenizer), or a .onnx file (those files beside it); otherwise the "
                         ".onnx file to write. Never inside a folder the export reads")
    ex.add_argument("--dtype", choices=["float32", "float16"], default=None)
    ex.add_argument("--logits", choices=["last", "all"], default=None,
                    help="generation graph: logits of the last position only (default) or of all")
    ex.add_argument("--no-cache", action="store_true",
                    help="a plain graph without KV cache: input_ids, attention_mask -> logits")
    ex.add_argument("--length", type=tokens_int, default=None,
                    help="--no-cache: example sequence length for tracing (default 8)")
    add_json(ex, "the output path")
    ex.set_defaults(func=cmd_export,
                    needs=lambda args: ("onnx",) + (("hf",) if args.adapter else ()))

    orr = sub.add_parser("ort-run", help="run an exported model on onnxruntime with random inputs",
                         description="Load an exported .onnx with OrtModel, run it on random "
                                     "inputs, print output shapes and latency.")
    orr.add_argument("model", help="the .onnx file")
    orr.add_argument("--batch", type=batch_int, default=2)
    orr.add_argument("--length", type=tokens_int, default=16)
    orr.add_argument("--repeat", type=some_count_int, default=20, help="timed runs after one warm-up")
    orr.add_argument("--provider", help="execution provider (default: CUDA if available, else CPU)")
    add_json(orr, "the result")
    orr.set_defaults(func=cmd_ort_run, needs=lambda args: ("onnx",))
