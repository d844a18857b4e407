"""`moe-ext generate`: text from a MoLoRA adapter on its base model (PyTorch), or from a
generation graph written by `moe-ext export --adapter` (onnxruntime, --onnx). The option
parsing (add_generation_options, generation_options, parse_steer, parse_mix) is shared by
both."""
from __future__ import annotations

import argparse
import math
import os
from typing import Optional

from ..hf.models import DTYPES, load_adapter_tokenizer, load_molora_model
from ..molora import mix_tensor
from ..pmol.generate import GenerationOptions, generate
from ..serve.engines import TextEngine
from .common import (add_json, check_exists, fail, parse_assignments, positive_float, print_json,
                     probability, quiet_transformers, seed_int, tokens_int)


def parse_steer(values) -> dict[str, float]:
    """["GROUP=BIAS", ...] -> {group: bias}; ValueError naming --steer."""
    steer = {}
    for group, bias in parse_assignments(values, "--steer", "GROUP=BIAS, e.g. safe=2.0").items():
        try:
            steer[group] = float(bias)
        except ValueError:
            steer[group] = math.nan
        if not math.isfinite(steer[group]):
            raise ValueError(f"--steer {group}={bias}: BIAS must be a finite number")
    return steer


def parse_mix(values) -> dict[str, float]:
    """["concise=0.3,verbose=0.7", ...] (comma- or space-separated GROUP=WEIGHT) ->
    {group: weight}; ValueError naming --mix for a weight that is not a finite number >= 0,
    or weights that are all zero. Unknown groups are named once the model is loaded."""
    items = [part for value in values or [] for part in value.split(",") if part]
    mix = {}
    form = "GROUP=WEIGHT, e.g. concise=0.3,verbose=0.7"
    for group, weight in parse_assignments(items, "--mix", form).items():
        try:
            mix[group] = float(weight)
        except ValueError:
            mix[group] = math.nan
        if not math.isfinite(mix[group]) or mix[group] < 0:
            raise ValueError(f"--mix {group}={weight}: WEIGHT must be a finite number >= 0")
    if mix and sum(mix.values()) <= 0:
        raise ValueError(f"--mix {','.join(items)}: the weights must not all be zero")
    return mix


def add_generation_options(p: argparse.ArgumentParser) -> None:
    """--prompt, --max-new-tokens, --steer and the decoding flags."""
    d = GenerationOptions
    p.add_argument("--prompt", required=True, help="the user's message (the tokenizer's chat "
                                                   "template is applied when it has one)")
    p.add_argument("--max-new-tokens", type=tokens_int, default=d.max_new_tokens)
    p.add_argument("--steer", nargs="+", metavar="GROUP=BIAS",
                   help="add BIAS to the router logits of an expert group (e.g. safe=2)")
    p.add_argument("--mix", nargs="+", metavar="GROUP=WEIGHT",
                   help="the preference mix, e.g. concise=0.3,verbose=0.7 (normalised; groups "
                        "left out weigh 0): the routers' input of a steerable adapter "
                        "(train-pmol --mix-alpha; with --onnx, its export's "
                        "preference_weights input), group biases log(weight) for another "
                        "(--adapter only)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=positive_float, default=d.temperature)
    p.add_argument("--top-k", type=tokens_int, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=probability, help="nucleus sampling")
    p.add_argument("--seed", type=seed_int, help="seed of the sampling")
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as plain text")


def generation_options(args: argparse.Namespace) -> GenerationOptions:
    """GenerationOptions from the parsed options; ValueError naming a bad one."""
    return GenerationOptions(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             seed=args.seed, chat_template=not args.no_chat_template)


def generate_onnx(path: str, tokenizer, prompt, options: GenerationOptions,
                  steer: dict[str, float], provider=None, runtime: str = "auto",
                  mix: Optional[dict[str, float]] = None) -> dict:
    """{"text", "new_tokens", "runtime", "provider"}: what the exported folder or graph at
    `path` generates after `prompt`, on onnxruntime-genai (runtime "genai", the default
    where it is installed and the folder has genai_config.json) or on OrtCausalLM ("ort"),
    with the same prompt encoding and decoding flags as generate(). tokenizer: a tokenizer,
    a hub id or folder, or None (the export's folder). mix: a steerable graph's preference
    mix {group: weight}; ValueError naming --mix for a bad one."""
    from ..export.generate import mix_weights

    engine = TextEngine(path, runtime, provider, tokenizer)
    mix_weights(engine.groups, engine.lm.steerable, mix, "--mix")  # named as the option
    out = engine.generate(prompt, options, steer or None, mix)
    return {**out, "runtime": engine.runtime, "provider": engine.provider}


def cmd_generate(args) -> int:
    quiet_transformers()
    try:
        options = generation_options(args)
        steer = parse_steer(args.steer)
        mix = parse_mix(args.mix) or None
        if mix and steer:
            return fail("give --mix or --steer, not both")
        if args.onnx:
            if args.base:
                return fail("--base is for --adapter; an --onnx graph holds its base")
            if args.dtype:
                return fail("--dtype is for --adapter; an --onnx graph has its own dtype")
            if not os.path.exists(args.onnx):
                raise ValueError(f"--onnx {args.onnx!r}: no such folder or file")
            result = generate_onnx(args.onnx, args.tokenizer, args.prompt, options, steer,
                                   args.provider, args.runtime, mix)
            text = result["text"]
        else:
            if args.tokenizer or args.provider or args.runtime != "auto":
                return fail("--tokenizer, --provider and --runtime are for --onnx")
            check_exists(args.adapter, "--adapter")
            model = load_molora_model(args.adapter, args.base, args.dtype or "float32")
            tokenizer = load_adapter_tokenizer(args.adapter, args.base)
            if mix:
                mix_tensor(model, mix, "--mix")  # unknown groups named as the option
            text = generate(model, tokenizer, args.prompt, options, steer, mix=mix)
    except (OSError, ValueError) as err:
        return fail(str(err))
    if args.json:
        extra = {k: result[k] for k in ("runtime", "provider")} if args.onnx else {}
        print_json({"prompt": args.prompt, "steer": steer, "mix": mix, "text": text, **extra})
    else:
        print(text)
    return 0


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text with a MoLoRA adapter on its base model",
                       description="Load a MoLoRA / PMoL adapter on its base model (the one "
                                   "the adapter records, or --base) and print the text it "
                                   "generates for --prompt; greedy unless --do-sample; "
                                   "--mix or --steer dials the preference mix (--onnx: "
                                   "--mix needs a steerable adapter's export). With --onnx, "
                                   "the same "
                                   "from a folder of `moe-ext export --adapter` on "
                                   "onnxruntime-genai (or onnxruntime).")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--adapter", help="adapter folder (train-pmol's output/adapter, a "
                                          "Trainer checkpoint, save_pretrained)")
    source.add_argument("--onnx", metavar="FOLDER",
                        help="folder (or its .onnx graph) written by `moe-ext export --adapter` "
                             "(the tokenizer is read from there unless --tokenizer)")
    p.add_argument("--base", help="base model hub id or folder (default: the adapter's record)")
    p.add_argument("--tokenizer", help="--onnx: tokenizer hub id or folder")
    p.add_argument("--provider", help="--onnx: cpu or cuda, or an onnxruntime execution "
                                      "provider name (default: CUDA when available, else CPU)")
    p.add_argument("--runtime", choices=["auto", "genai", "ort"], default="auto",
                   help="--onnx: onnxruntime-genai (its C++ loop), onnxruntime with moe_ext's "
                        "loop, or auto: genai when installed and the folder has genai_config.json")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="--adapter: dtype of the model (default float32; an --onnx graph "
                        "has its own)")
    add_generation_options(p)
    add_json(p, "the prompt and the text")
    p.set_defaults(func=cmd_generate,
                   needs=lambda args: ("hf",) + (("onnx",) if args.onnx else ()))
