"""`moe-ext serve`: the HTTP server of moe_ext.serve (FastAPI on uvicorn) over an exported
generation folder and/or a reward model with per-user profiles."""
from __future__ import annotations

import socket

from .. import serve as serving
from ..serve import RewardEngine, TextEngine, feedback_update, open_store
from .common import (check_exists, fail, nonnegative_int, positive_float, positive_int,
                     quiet_transformers)


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) for uvicorn; OSError naming --host / --port."""
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say TCP, and
    # without it every response waited for the client's delayed ACK (40 ms a request)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM,
                         socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise OSError(f"--host {host} --port {port}: cannot listen there ({err.strerror})") from None
    return sock


def cmd_serve(args) -> int:
    quiet_transformers()
    try:
        if not args.model and not args.reward_model:
            return fail("serve needs --model FOLDER (generation), --reward-model DIR "
                        "(scoring and feedback), or both")
        import uvicorn  # the serve extra

        text = reward = store = update = None
        if args.model:
            text = TextEngine(args.model, args.runtime, args.provider)
        if args.reward_model:
            check_exists(args.reward_model, "--reward-model")
            reward = RewardEngine(args.reward_model)
            store = open_store(args.db, reward.num_experts)
            update = feedback_update(args.method, args.eta)
        # serving.make_app imports fastapi (the serve extra) on first use
        app = serving.make_app(text, reward, store, update,
                               serving.ServeLimits(args.max_new_tokens_limit, args.max_responses))
        sock = listen_socket(args.host, args.port)
    except (OSError, ValueError) as err:
        return fail(str(err))
    host, port = sock.getsockname()[:2]
    what = [f"generation ({text.runtime} on {text.provider})" if text else None,
            f"reward model ({reward.num_experts} experts, profiles in {store.kind})" if reward else None]
    print(f"moe-ext serve: {', '.join(w for w in what if w)} on http://{host}:{port}", flush=True)
    config = uvicorn.Config(app, log_level="warning" if args.quiet else "info",
                            access_log=not args.quiet)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="HTTP server: generation with steering, reward scoring, user feedback",
        description="Serve an exported generation folder (`moe-ext export --adapter ... "
                    "--output FOLDER`; onnxruntime-genai when installed, else onnxruntime) "
                    "at POST /generate (Server-Sent Events with stream: true), and a reward "
                    "model (train-rm folder) at POST /score and POST /feedback (a user's "
                    "labelled pair updates their weights over the experts online, as "
                    "`moe-ext adapt` does); GET /users/ID, GET /health. Profiles persist in "
                    "a SQLite file (--db), or in a server database given as a SQLAlchemy URL "
                    "when several server processes share them. Listens on 127.0.0.1 unless "
                    "--host says otherwise.")
    p.add_argument("--model", metavar="FOLDER", help="exported generation folder (or its .onnx)")
    p.add_argument("--reward-model", metavar="DIR", help="reward model folder written by train-rm")
    p.add_argument("--db", default="profiles.db",
                   help="user profiles: a SQLite file (default profiles.db, created when "
                        "missing) or a SQLAlchemy URL such as postgresql+psycopg://u:p@host/db "
                        "(pip install 'moe_ext[serve-db]' and the driver)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=nonnegative_int, default=8000, help="port (0: any free one)")
    p.add_argument("--runtime", choices=["auto", "genai", "ort"], default="auto",
                   help="generation runtime: onnxruntime-genai, onnxruntime with moe_ext's "
                        "loop, or auto (genai when installed)")
    p.add_argument("--provider", help="cpu or cuda (default: CUDA when available)")
    p.add_argument("--method", choices=["hedge", "hyre", "gradient"], default="hedge",
                   help="feedback update: hedge (online multiplicative weights, default), or "
                        "hyre / gradient refit on all the user's pairs")
    p.add_argument("--eta", type=positive_float, default=0.1, help="hedge learning rate")
    p.add_argument("--max-new-tokens-limit", type=positive_int, default=512,
                   help="the most new tokens one /generate may ask for")
    p.add_argument("--max-responses", type=positive_int, default=64,
                   help="the most responses one /score may rank")
    p.add_argument("--quiet", action="store_true", help="no access log")
    p.set_defaults(func=cmd_serve)
