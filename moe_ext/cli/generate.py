"""`moe-ext generate`: text from a MoLoRA adapter on its base model (PyTorch), or from a
generation graph written by `moe-ext export --adapter` (onnxruntime, --onnx). The option
parsing (add_generation_options, generation_options, parse_steer, parse_mix) is shared by
both."""
from __future__ import annotations

import argparse
import math
import os

import torch

from ..data import encode_prompt
from ..hf.models import DTYPES, load_adapter_tokenizer, load_molora_model, load_tokenizer
from ..molora import mix_tensor
from ..pmol.generate import GenerationOptions, generate
from .common import (add_json, check_exists, fail, nonnegative_int, parse_assignments,
                     positive_float, positive_int, print_json, probability, quiet_transformers)


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
    for group, weight in parse_assignments(items, "--mix", "GROUP=WEIGHT, e.g. concise=0.3,verbose=0.7").items():
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
    p.add_argument("--max-new-tokens", type=positive_int, default=d.max_new_tokens)
    p.add_argument("--steer", nargs="+", metavar="GROUP=BIAS",
                   help="add BIAS to the router logits of an expert group (e.g. safe=2)")
    p.add_argument("--mix", nargs="+", metavar="GROUP=WEIGHT",
                   help="the preference mix, e.g. concise=0.3,verbose=0.7 (normalised; groups "
                        "left out weigh 0): the routers' input of a steerable adapter "
                        "(train-pmol --mix-alpha), group biases log(weight) for another")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=positive_float, default=d.temperature)
    p.add_argument("--top-k", type=positive_int, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=probability, help="nucleus sampling")
    p.add_argument("--seed", type=nonnegative_int, help="seed of the sampling")
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as plain text")


def generation_options(args: argparse.Namespace) -> GenerationOptions:
    """GenerationOptions from the parsed options; ValueError naming a bad one."""
    return GenerationOptions(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             seed=args.seed, chat_template=not args.no_chat_template)


def generate_onnx(path: str, tokenizer, prompt, options: GenerationOptions,
                  steer: dict[str, float], provider=None) -> str:
    """The text that the generation graph at `path` (export_causal_lm) generates after
    `prompt` on onnxruntime, with the same prompt encoding and decoding flags as generate()."""
    from ..export import OrtCausalLM  # onnxruntime is an optional extra

    lm = OrtCausalLM(path, [provider] if provider else None)
    ids = torch.tensor([encode_prompt(tokenizer, prompt, options.chat_template)])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = lm.generate(ids, torch.ones_like(ids), max_new_tokens=options.max_new_tokens,
                      do_sample=options.do_sample, temperature=options.temperature,
                      top_k=options.top_k or 0,
                      top_p=options.top_p if options.top_p is not None else 1.0,
                      seed=options.seed, pad_token_id=pad, steer=steer or None,
                      eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def cmd_generate(args) -> int:
    quiet_transformers()
    try:
        options = generation_options(args)
        steer = parse_steer(args.steer)
        mix = parse_mix(args.mix) or None
        if mix and steer:
            return fail("give --mix or --steer, not both")
        if args.onnx and mix:
            return fail("--mix is for --adapter: generation graphs take no preference mix "
                        "yet (steer one with --steer)")
        if args.onnx:
            if args.base:
                return fail("--base is for --adapter; an --onnx graph holds its base")
            if args.dtype:
                return fail("--dtype is for --adapter; an --onnx graph has its own dtype")
            check_exists(args.onnx, "--onnx", folder=False)
            tokenizer = load_tokenizer(args.tokenizer or os.path.dirname(os.path.abspath(args.onnx)))
            text = generate_onnx(args.onnx, tokenizer, args.prompt, options, steer, args.provider)
        else:
            if args.tokenizer or args.provider:
                return fail("--tokenizer and --provider are for --onnx graphs")
            check_exists(args.adapter, "--adapter")
            model = load_molora_model(args.adapter, args.base, args.dtype or "float32")
            tokenizer = load_adapter_tokenizer(args.adapter, args.base)
            if mix:
                mix_tensor(model, mix, "--mix")  # unknown groups named as the option
            text = generate(model, tokenizer, args.prompt, options, steer, mix=mix)
    except (OSError, ValueError) as err:
        return fail(str(err))
    if args.json:
        print_json({"prompt": args.prompt, "steer": steer, "mix": mix, "text": text})
    else:
        print(text)
    return 0


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text with a MoLoRA adapter on its base model",
                       description="Load a MoLoRA / PMoL adapter on its base model (the one "
                                   "the adapter records, or --base) and print the text it "
                                   "generates for --prompt; greedy unless --do-sample; "
                                   "--mix (or --steer) dials the preference mix. With --onnx, the same "
                                   "on onnxruntime from a graph of `moe-ext export --adapter`.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--adapter", help="adapter folder (train-pmol's output/adapter, a "
                                          "Trainer checkpoint, save_pretrained)")
    source.add_argument("--onnx", metavar="FILE",
                        help="generation graph written by `moe-ext export --adapter` (its "
                             "tokenizer is read from the graph's folder unless --tokenizer)")
    p.add_argument("--base", help="base model hub id or folder (default: the adapter's record)")
    p.add_argument("--tokenizer", help="--onnx: tokenizer hub id or folder")
    p.add_argument("--provider", help="--onnx: onnxruntime execution provider "
                                      "(default: CUDA when available, else CPU)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="--adapter: dtype of the model (default float32; an --onnx graph "
                        "has its own)")
    add_generation_options(p)
    add_json(p, "the prompt and the text")
    p.set_defaults(func=cmd_generate)
