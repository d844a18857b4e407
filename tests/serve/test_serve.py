"""`moe-ext serve` through a real HTTP client (httpx) against the server process on
127.0.0.1: startup and /health, /generate (the library's text, steering, SSE streaming),
/score and /feedback (a user's profile and personalised rewards), bad requests answered 4xx,
concurrent feedback for one user losing no update, and profiles surviving a restart."""
import asyncio
import json
import os
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("transformers")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "export"))

from moe_ext import cli, pmol  # noqa: E402
from moe_ext.export.genai_config import export_folder  # noqa: E402
from moe_ext.reward import adapt_weights  # noqa: E402
from moe_ext.serve import RewardEngine  # noqa: E402
from moe_ext.serve.process import ServerProcess as Server  # noqa: E402

from tiny_models import PROMPTS, bpe_tokenizer, tiny_lm, with_molora  # noqa: E402

STEER = {"safe": 3.0, "concise": -1.0}
PAIRS = [("question about cats", "a kind detailed answer about cats", "go away"),
         ("question about code", "short code", "a long rambling essay on code"),
         ("question about safety", "a careful safe answer", "a reckless answer")]


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    """(PyTorch LM, tokenizer, exported folder, reward model folder)."""
    root = tmp_path_factory.mktemp("serve")
    tok = bpe_tokenizer()
    model = with_molora(tiny_lm("llama", len(tok)))
    export_folder(model, str(root / "lm"), tok)
    rows = [{"prompt": f"{p} {i}", "chosen": c, "rejected": r, "category": k}
            for i in range(20) for k, (p, c, r) in enumerate(PAIRS)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(["train-rm", "--data", str(root / "pairs.jsonl"), "--experts", "3",
                     "--top-k", "2", "--epochs", "5", "--output", str(root / "rm"), "--json"]) == 0
    return model, tok, str(root / "lm"), str(root / "rm")


@pytest.fixture(scope="module")
def server(artefacts, tmp_path_factory):
    _, _, lm, rm = artefacts
    db = tmp_path_factory.mktemp("db") / "profiles.db"
    s = Server(["--model", lm, "--reward-model", rm, "--db", db, "--max-new-tokens-limit", "64"])
    s.db = db
    yield s
    assert s.stop(), s.lines


def post(server, path, body, **kwargs):
    return httpx.post(server.url + path, json=body, timeout=120, **kwargs)


def test_health_says_what_runs(server):
    assert server.url.startswith("http://127.0.0.1:")
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok"
    assert h["generation"]["runtime"] == "genai" and h["generation"]["provider"] == "cpu"
    assert h["generation"]["groups"] == ["concise", "safe"] and h["generation"]["steerable"] is False
    assert h["reward"] == {"experts": 3, "profiles": "sqlite"}


def test_generate_gives_the_library_text_and_steers(server, artefacts):
    model, tok, _, _ = artefacts
    options = pmol.GenerationOptions(max_new_tokens=12, chat_template=False)
    texts = {}
    for name, steer in (("plain", {}), ("steered", STEER)):
        r = post(server, "/generate", {"prompt": PROMPTS[1], "max_new_tokens": 12,
                                       "chat_template": False, "steer": steer})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["runtime"] == "genai" and body["new_tokens"] >= 1
        assert body["text"] == pmol.generate(model, tok, PROMPTS[1], options, steer or None)
        texts[name] = body["text"]
    assert texts["plain"] != texts["steered"]


def test_generate_streams_server_sent_events(server):
    body = {"prompt": PROMPTS[0], "max_new_tokens": 12, "chat_template": False, "steer": STEER}
    whole = post(server, "/generate", body).json()["text"]
    events = []
    with httpx.stream("POST", server.url + "/generate", json={**body, "stream": True},
                      timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]" and len(events) > 2
    assert "".join(json.loads(e)["text"] for e in events[:-1]).strip() == whole


def test_score_and_feedback_personalise_the_rewards(server, artefacts):
    _, _, _, rm = artefacts
    engine = RewardEngine(rm)
    prompt, responses = "question about cats 99", ["a kind detailed answer about cats", "go away"]
    r = post(server, "/score", {"prompt": prompt, "responses": responses})
    assert r.status_code == 200 and r.json()["personalized"] is False
    routed = r.json()["rewards"]
    assert routed == pytest.approx(engine.score(prompt, responses, None), abs=1e-5)
    assert httpx.get(server.url + "/users/alice").status_code == 404
    for p, c, rej in PAIRS[1:]:
        f = post(server, "/feedback", {"user_id": "alice", "prompt": p, "chosen": c, "rejected": rej})
        assert f.status_code == 200, f.text
    profile = f.json()
    assert profile["pairs"] == 2 and sum(profile["weights"]) == pytest.approx(1, abs=1e-5)
    margins = torch.tensor([engine.margins(p, c, rej) for p, c, rej in PAIRS[1:]])
    assert profile["weights"] == pytest.approx(adapt_weights(margins, "hedge", eta=0.1).tolist(), abs=1e-5)
    assert httpx.get(server.url + "/users/alice").json()["weights"] == profile["weights"]
    s = post(server, "/score", {"prompt": prompt, "responses": responses, "user_id": "alice"}).json()
    assert s["personalized"] is True
    assert s["rewards"] == pytest.approx(engine.score(prompt, responses, profile["weights"]), abs=1e-5)
    # an unknown user is scored by the router
    assert post(server, "/score", {"prompt": prompt, "responses": responses,
                                   "user_id": "nobody"}).json()["rewards"] == routed


@pytest.mark.parametrize("path,body,status,words", [
    ("/generate", {"max_new_tokens": 4}, 422, "prompt"),
    ("/generate", {"prompt": "hi", "max_new_tokens": 0}, 422, "max_new_tokens"),
    ("/generate", {"prompt": "hi", "max_new_tokens": 65}, 400, "at most 64"),
    ("/generate", {"prompt": "hi", "steer": {"kind": 1}}, 400, "unknown expert group 'kind'"),
    ("/generate", {"prompt": "hi", "temperture": 0.5}, 422, "temperture"),
    ("/generate", {"prompt": "hi", "top_p": 1.5}, 422, "top_p"),
    ("/generate", {"prompt": "hi", "steer": {"safe": "much"}}, 422, "steer"),
    ("/generate", {"prompt": "hi", "mix": {"safe": 1}}, 400, "take no preference mix"),
    ("/score", {"prompt": "q", "responses": []}, 422, "responses"),
    ("/score", {"prompt": "q", "responses": ["a"] * 65}, 400, "at most 64"),
    ("/feedback", {"user_id": "", "prompt": "q", "chosen": "a", "rejected": "b"}, 422, "user_id"),
    ("/feedback", {"user_id": "u", "prompt": "q", "chosen": "a"}, 422, "rejected"),
])
def test_bad_requests_get_4xx_naming_the_problem(server, path, body, status, words):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    assert words in r.text


def test_malformed_bodies_and_methods(server):
    for raw in (b"{not json", b'{"prompt": "hi", "temperature": NaN}', b"[1, 2]"):
        r = httpx.post(server.url + "/generate", content=raw, timeout=60,
                       headers={"content-type": "application/json"})
        assert r.status_code == 422, (raw, r.text)
    assert httpx.get(server.url + "/generate").status_code == 405
    assert httpx.get(server.url + "/nowhere").status_code == 404
    assert httpx.get(server.url + "/health").status_code == 200  # still up


def test_concurrent_feedback_for_one_user_loses_no_update(server, artefacts):
    _, _, _, rm = artefacts
    engine = RewardEngine(rm)
    pairs = [(f"{p} {i}", c if i % 2 else r, r if i % 2 else c)
             for i in range(8) for p, c, r in PAIRS]          # 24 pairs, both directions

    def send(pair):
        with httpx.Client(timeout=120) as client:
            return client.post(server.url + "/feedback", json={
                "user_id": "bob", "prompt": pair[0], "chosen": pair[1], "rejected": pair[2]})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, pairs))
    assert all(a.status_code == 200 for a in answers)
    assert sorted(a.json()["pairs"] for a in answers) == list(range(1, 25))  # each saw its own
    final = httpx.get(server.url + "/users/bob").json()
    margins = torch.tensor([engine.margins(*pair) for pair in pairs])
    # Hedge's factors multiply, so the order of arrival does not matter
    assert final["pairs"] == 24
    assert final["weights"] == pytest.approx(adapt_weights(margins, "hedge", eta=0.1).tolist(), abs=1e-5)


def test_restart_keeps_the_profiles(artefacts, tmp_path):
    _, _, _, rm = artefacts
    db = tmp_path / "p.db"
    first = Server(["--reward-model", rm, "--db", db])
    try:
        p, c, r = PAIRS[0]
        before = post(first, "/feedback", {"user_id": "carol", "prompt": p, "chosen": c,
                                           "rejected": r}).json()
        assert post(first, "/generate", {"prompt": "hi"}).status_code == 404  # no --model
    finally:
        assert first.stop(), first.lines
    second = Server(["--reward-model", rm, "--db", db])
    try:
        assert httpx.get(second.url + "/users/carol").json() == before
        p, c, r = PAIRS[1]
        after = post(second, "/feedback", {"user_id": "carol", "prompt": p, "chosen": c,
                                           "rejected": r}).json()
        assert after["pairs"] == 2
    finally:
        assert second.stop(), second.lines


def test_serve_command_errors(artefacts, tmp_path, capsys):
    _, _, lm, rm = artefacts
    assert cli.main(["serve"]) == 2
    assert "--model" in capsys.readouterr().err
    assert cli.main(["serve", "--reward-model", rm, "--db", str(tmp_path / "no" / "p.db")]) == 2
    assert "--db" in capsys.readouterr().err
    assert cli.main(["serve", "--model", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert cli.main(["serve", "--model", lm, "--runtime", "genai", "--provider", "tpu"]) == 2
    assert "provider" in capsys.readouterr().err


def test_connections_to_the_listening_socket_send_without_delay():
    """asyncio turns Nagle off (TCP_NODELAY) only on sockets created as TCP: with the
    socket made by `moe-ext serve`, every response went out 40 ms late (delayed ACK)."""
    from moe_ext.cli.serve import listen_socket

    sock = listen_socket("127.0.0.1", 0)
    seen = []

    async def main():
        def accepted(reader, writer):
            seen.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP,
                                                                   socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(accepted, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname())
        while not seen:
            await asyncio.sleep(0.01)
        writer.close()
        server.close()

    asyncio.run(main())
    assert seen == [1]
    with pytest.raises(OSError, match="--host 203.0.113.1 --port 8000: cannot listen"):
        listen_socket("203.0.113.1", 8000)  # an address of no interface here


def test_the_reward_model_runs_on_one_thread_of_its_own(artefacts):
    """Torch calls from the server's many worker threads were 50x slower than on one
    thread; RewardEngine sends them all to its own thread."""
    engine = RewardEngine(artefacts[3])
    names = []
    forward = engine.model.forward

    def spy(*args, **kwargs):
        names.append(threading.current_thread().name)
        return forward(*args, **kwargs)

    engine.model.forward = spy
    threads = [threading.Thread(target=engine.score, args=("q", ["a", "b"], None)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(names) == 3 and all(n.startswith("moe-ext-reward") for n in names)
