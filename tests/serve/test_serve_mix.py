"""POST /generate with a preference mix {group: weight} on a steerable adapter's export (the
app in process, on the engine `moe-ext serve` loads): the text PyTorch generates under the
mix, streamed alike, and bad mixes answered 400 / 422 naming the problem."""
import json
import os
import sys

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("transformers")
pytest.importorskip("fastapi")
pytest.importorskip("httpx")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "export"))

from fastapi.testclient import TestClient  # noqa: E402

from moe_ext import pmol  # noqa: E402
from moe_ext.export.genai_config import export_folder  # noqa: E402
from moe_ext.serve import TextEngine  # noqa: E402
from moe_ext.serve.app import make_app  # noqa: E402

from tiny_models import PROMPTS, bpe_tokenizer, tiny_lm, with_molora  # noqa: E402

MIX = {"concise": 0.2, "verbose": 0.8}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(steerable PyTorch LM, tokenizer, a TestClient of the app over its export)."""
    tok = bpe_tokenizer()
    model = with_molora(tiny_lm("llama", len(tok)), steerable=True)
    folder = str(tmp_path_factory.mktemp("serve-mix"))
    export_folder(model, folder, tok)
    return model, tok, TestClient(make_app(text=TextEngine(folder)))


def test_generate_with_a_mix_gives_the_pytorch_text_and_streams_it(served):
    model, tok, client = served
    assert client.get("/health").json()["generation"]["steerable"] is True
    options = pmol.GenerationOptions(max_new_tokens=12, chat_template=False)
    body = {"prompt": PROMPTS[1], "max_new_tokens": 12, "chat_template": False}
    texts = {}
    for name, mix in (("plain", None), ("mixed", MIX)):
        r = client.post("/generate", json={**body, "mix": mix})
        assert r.status_code == 200, r.text
        texts[name] = r.json()["text"]
        assert texts[name] == pmol.generate(model, tok, PROMPTS[1], options, mix=mix)
    assert texts["plain"] != texts["mixed"]
    events = client.post("/generate", json={**body, "mix": MIX, "stream": True}).text
    pieces = [json.loads(line[6:])["text"] for line in events.splitlines()
              if line.startswith("data: {")]
    assert "".join(pieces).strip() == texts["mixed"]


@pytest.mark.parametrize("mix,status,words", [
    ({"concise": -1.0}, 400, "mix weights must be >= 0"),
    ({"concise": 0.0}, 400, "must not all be zero"),
    ({}, 400, "must not all be zero"),
    ({"kind": 1.0}, 400, "mix names unknown groups ['kind']"),
    ({"concise": "much"}, 422, "mix"),
])
def test_bad_mixes_get_4xx_naming_the_problem(served, mix, status, words):
    r = served[2].post("/generate", json={"prompt": "hi", "mix": mix})
    assert r.status_code == status and words in r.text, r.text


def test_mix_and_steer_together_are_refused(served):
    r = served[2].post("/generate", json={"prompt": "hi", "mix": MIX, "steer": {"concise": 1}})
    assert r.status_code == 400 and "give mix or steer, not both" in r.text
