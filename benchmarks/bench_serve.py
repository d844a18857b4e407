"""Load on `moe-ext serve` over loopback: requests per second and latency percentiles of
/generate, /score and /feedback at 1, 8 and 32 concurrent clients, and, beside them, the
tokens per second of the same generation without a server (onnxruntime-genai alone,
OrtCausalLM, transformers' generate on the PyTorch model).

The model is a random-weight PMoL Llama built here (no download; --hidden, --layers, a
byte-level BPE tokenizer of --vocab tokens trained on a few sentences) exported with
export_folder; the reward model is trained here by `moe-ext train-rm` on text pairs
(hashing encoder). The server runs in its own process on 127.0.0.1 (ServerProcess); each
client is a thread with its own httpx connection. A cell stops after --requests requests
or --max-seconds, whichever comes first. Greedy generation of --new-tokens tokens, EOS
stops at the model's EOS, so tokens per second count the tokens made.

    python benchmarks/bench_serve.py --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import threading
import time

import numpy as np
import torch

import moe_ext
from harness import machine_facts, pmol_llama, report
from moe_ext import cli
from moe_ext.export import OrtCausalLM
from moe_ext.export.genai import GenaiCausalLM, genai_available
from moe_ext.export.genai_config import export_folder
from moe_ext.serve.process import ServerProcess
from moe_ext.utils.io import write_text

SENTENCES = ["The quick brown fox jumps over the lazy dog.",
             "Preference mixing routes each token to a few LoRA experts.",
             "A concise answer is short; a safe answer avoids harm; a verbose answer explains.",
             "Hello world! How are you today? I am fine, thank you."]
PROMPTS = ["Hello world, how are", "The quick brown fox", "A safe answer avoids", "Preference mixing"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=64, help="requests per cell (at most)")
    p.add_argument("--max-seconds", type=float, default=20.0, help="time per cell (at most)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--reps", type=int, default=5, help="runs of each engine without a server")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of torch here")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def build(args, folder: str):
    """(PyTorch PMoL model, tokenizer), the model exported to `folder`."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(
        vocab_size=args.vocab, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        padding_side="left")
    model = pmol_llama(len(tokenizer), args.hidden, args.layers, 2 * args.hidden,
                       max_positions=512, lora_std=0.05)
    export_folder(model, folder, tokenizer)
    return model, tokenizer


def train_reward(folder: str) -> str:
    pairs = [("question about cats", "a kind detailed answer", "go away"),
             ("question about code", "short code", "a long rambling essay"),
             ("question about safety", "a careful answer", "a reckless answer")]
    rows = [{"prompt": f"{p} {i}", "chosen": c, "rejected": r, "category": k}
            for i in range(30) for k, (p, c, r) in enumerate(pairs)]
    data = os.path.join(folder, "pairs.jsonl")
    write_text(data, "".join(json.dumps(r) + "\n" for r in rows))
    out = os.path.join(folder, "rm")
    code = cli.main(["train-rm", "--data", data, "--experts", "3", "--top-k", "2", "--epochs", "5",
                     "--output", out, "--json"])
    if code != 0:
        raise SystemExit("train-rm failed")
    return out


def load(url: str, path: str, bodies, concurrency: int, requests: int, max_seconds: float) -> dict:
    """Sends up to `requests` POSTs (bodies cycled) from `concurrency` threads until done or
    `max_seconds`; latencies of the completed ones, their count, errors, wall time."""
    import httpx

    lock = threading.Lock()
    issued, latencies, errors, tokens = [0], [], [0], [0]
    stop_at = time.perf_counter() + max_seconds
    # TCP_NODELAY: httpx writes the headers and the body of a POST apart, and without it
    # Nagle holds the body until the server's delayed ACK (40 ms on Linux loopback)
    nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]

    def client():
        with httpx.Client(timeout=300, transport=httpx.HTTPTransport(socket_options=nodelay)) as http:
            while True:
                with lock:
                    if issued[0] >= requests or time.perf_counter() >= stop_at:
                        return
                    i = issued[0]
                    issued[0] += 1
                t0 = time.perf_counter()
                r = http.post(url + path, json=bodies[i % len(bodies)])
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200:
                        latencies.append(dt)
                        tokens[0] += r.json().get("new_tokens", 0) if path == "/generate" else 0
                    else:
                        errors[0] += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ms = np.asarray(latencies) * 1e3 if latencies else np.asarray([np.nan])
    return {"requests": len(latencies), "errors": errors[0], "seconds": wall,
            "requests_per_s": len(latencies) / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p90_ms": float(np.percentile(ms, 90)), "p99_ms": float(np.percentile(ms, 99)),
            "tokens_per_s": tokens[0] / wall if path == "/generate" else float("nan")}


def engines_alone(args, model, tokenizer, folder: str) -> list[dict]:
    """Tokens per second of one prompt at a time, no server: genai, OrtCausalLM, PyTorch."""
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    runs = []
    genai = GenaiCausalLM(folder) if genai_available() else None
    ort = OrtCausalLM(os.path.join(folder, "model.onnx"))
    steer = {"safe": 1.0}

    # each returns the number of new tokens (the EOS included when reached)
    def run_genai(row):
        return len(genai.generate([row], max_new_tokens=args.new_tokens, steer=steer)[0]) - len(row)

    def run_ort(row):
        out = ort.generate(np.asarray([row]), max_new_tokens=args.new_tokens, steer=steer)
        return out.shape[1] - len(row)

    def run_torch(row):
        moe_ext.set_group_bias(model, steer)
        try:
            with torch.no_grad():
                out = model.generate(torch.tensor([row]), max_new_tokens=args.new_tokens,
                                     do_sample=False, pad_token_id=0)
        finally:
            moe_ext.set_group_bias(model, None)
        return out.shape[1] - len(row)

    engines = ([("onnxruntime-genai", run_genai)] if genai else []) + \
        [("OrtCausalLM", run_ort), ("transformers", run_torch)]
    for name, fn in engines:
        fn(ids[0])  # warm-up
        times, made = [], 0
        for rep in range(args.reps):
            t0 = time.perf_counter()
            made += fn(ids[rep % len(ids)])
            times.append(time.perf_counter() - t0)
        med = float(np.median(times))
        runs.append({"mode": "no server", "endpoint": name, "clients": 1, "requests": args.reps,
                     "errors": 0, "requests_per_s": 1 / med, "p50_ms": med * 1e3,
                     "p90_ms": float(np.percentile(times, 90)) * 1e3,
                     "p99_ms": float(np.percentile(times, 99)) * 1e3,
                     "tokens_per_s": made / sum(times)})
    return runs


def main():
    args = parse_args()
    facts = machine_facts()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        lm = os.path.join(tmp, "lm")
        model, tokenizer = build(args, lm)
        rm = train_reward(tmp)
        rows = engines_alone(args, model, tokenizer, lm)
        workloads = {
            "/generate": [{"prompt": p, "max_new_tokens": args.new_tokens, "chat_template": False,
                           "steer": {"safe": 1.0}} for p in PROMPTS],
            "/score": [{"prompt": f"question about cats {i}", "responses": ["a kind answer", "go away"],
                        "user_id": "u0"} for i in range(4)],
            "/feedback": [{"user_id": f"u{i % 4}", "prompt": f"question {i}", "chosen": "a kind answer",
                           "rejected": "go away"} for i in range(8)],
        }
        with ServerProcess(["--model", lm, "--reward-model", rm, "--db",
                            os.path.join(tmp, "profiles.db")]) as server:
            runtime = next(l for l in server.lines if l.startswith("moe-ext serve:")).strip()
            for path, bodies in workloads.items():
                for c in args.concurrency:
                    r = load(server.url, path, bodies, c, args.requests, args.max_seconds)
                    rows.append({"mode": "server", "endpoint": path, "clients": c, **r})
                    print(f"{path} x{c}: {r['requests_per_s']:.1f} req/s, p50 {r['p50_ms']:.0f} ms, "
                          f"p99 {r['p99_ms']:.0f} ms, {r['errors']} errors", flush=True)
    import onnxruntime
    import uvicorn

    versions = (f"onnxruntime {onnxruntime.__version__}, onnxruntime-genai "
                f"{__import__('onnxruntime_genai').__version__ if genai_available() else 'absent'}, "
                f"uvicorn {uvicorn.__version__}")
    text = report("serve", rows, facts, args.out,
                  ["mode", "endpoint", "clients", "requests", "errors", "requests_per_s",
                   "p50_ms", "p90_ms", "p99_ms", "tokens_per_s"])
    note = (f"\nModel: random-weight PMoL Llama, hidden {args.hidden}, {args.layers} layers, vocab "
            f"{len(tokenizer)}, 3 groups x 2 LoRA experts + 1 null, top-2, r=8, float32; greedy, "
            f"at most {args.new_tokens} new tokens (stopping at EOS: "
            f"tokens_per_s counts the tokens made), steered safe=1. Reward model: 3 experts on "
            f"hashing embeddings; /feedback spreads over 4 users (hedge, SQLite). Server: "
            f"`{runtime}`, one process on 127.0.0.1; clients are threads of this process (same "
            f"2 cores). A cell: at most {args.requests} requests or {args.max_seconds:.0f} s. "
            f"No server: one prompt at a time, median of {args.reps} runs. {versions}. "
            f"Load average (1 min) {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at "
            f"the end: the machine's 2 cores are shared with other jobs, so read the numbers "
            f"as this busy machine's.\n")
    write_text(os.path.join(args.out, "serve-cpu.md"), text + note)
    print(text + note)


if __name__ == "__main__":
    main()
