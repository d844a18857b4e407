"""`moe-ext export --adapter` for a train-pmol output and for a base given by hub id (from a
Hugging Face cache built offline), the tokenizer beside the graph, ort-run on a generation
graph, and errors that name the option."""
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("transformers")

import huggingface_hub  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import moe_ext  # noqa: E402
from moe_ext import cli  # noqa: E402
from moe_ext.export import OrtCausalLM  # noqa: E402
from moe_ext.export.from_adapter import resolve_adapter, resolve_base  # noqa: E402
from moe_ext.pmol import load_pmol  # noqa: E402

from tiny_models import bpe_tokenizer, tiny_lm, with_molora  # noqa: E402

HUB_ID = "moe-ext-test/tiny-qwen2"


def test_export_pmol_artefact_then_generate_and_ort_run(tmp_path, capsys):
    run = tmp_path / "pmol"
    assert cli.main(["train-pmol", "--synthetic", "--synthetic-size", "10", "--steps", "2",
                     "--output", str(run), "--json", "--no-progress"]) == 0
    # an adapter folder inside a train-pmol output finds its base beside it
    adapter, artefact = resolve_adapter(str(run / "adapter"))
    assert resolve_base(adapter, artefact, None) == os.path.join(str(run), "base_model")
    out = tmp_path / "deploy"
    out.mkdir()
    capsys.readouterr()
    assert cli.main(["export", "--adapter", str(run), "--output", str(out / "pmol.onnx"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["base"] == os.path.join(str(run), "base_model") and result["tokenizer"] == str(out)
    pmol = load_pmol(str(run))
    tok = AutoTokenizer.from_pretrained(str(out))  # the word tokenizer, as a transformers one
    text = "<bos> " + " ".join(pmol.tokenizer.convert_ids_to_tokens(list(range(5, 9)))) + " <sep>"
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    assert ids["input_ids"][0].tolist() == pmol.tokenizer(text, add_special_tokens=False)["input_ids"]
    lm = OrtCausalLM(str(out / "pmol.onnx"))
    assert lm.groups == ["concise", "safe", "verbose"] and lm.eos_token_id == pmol.tokenizer.eos_token_id
    moe_ext.set_group_bias(pmol.model, {"verbose": 2.0})
    with torch.no_grad():
        want = pmol.model.generate(**ids, max_new_tokens=8, do_sample=False)
    got = lm.generate(ids["input_ids"], ids["attention_mask"], max_new_tokens=8, steer={"verbose": 2.0})
    assert torch.equal(got, want)
    assert tok.decode(got[0]) == pmol.tokenizer.decode(got[0])
    # moe-ext generate on the graph gives the text generate gives on the adapter
    prompt = " ".join(pmol.tokenizer.convert_ids_to_tokens(list(range(6, 10))))
    texts = []
    for source in (["--adapter", str(run / "adapter")], ["--onnx", str(out / "pmol.onnx")]):
        capsys.readouterr()
        assert cli.main(["generate", *source, "--prompt", prompt, "--steer", "verbose=2",
                         "--max-new-tokens", "6", "--json"]) == 0
        texts.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"])
    assert texts[0] == texts[1] and texts[0]
    assert cli.main(["generate", "--onnx", str(out / "pmol.onnx"), "--prompt", prompt,
                     "--base", str(run)]) == 2
    assert cli.main(["ort-run", str(out / "pmol.onnx"), "--batch", "2", "--length", "5",
                     "--repeat", "1", "--json"]) == 0
    run_result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert run_result["outputs"]["logits"] == [2, 1, len(pmol.tokenizer)]
    assert run_result["outputs"]["present"][2] == 5


def fake_hub(cache):
    """A Hugging Face hub cache holding HUB_ID (a tiny Qwen2) at one snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + HUB_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    tok = bpe_tokenizer()
    tiny_lm("qwen2", len(tok)).save_pretrained(str(snapshot))
    tok.save_pretrained(str(snapshot))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return tok


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_export_base_by_hub_id_recorded_in_the_adapter(tmp_path, offline_hub, capsys):
    tok = fake_hub(offline_hub)
    model = with_molora(tiny_lm("qwen2", len(tok)))
    adapter = tmp_path / "adapter"
    moe_ext.save_molora(model, str(adapter))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": HUB_ID}))
    out = tmp_path / "out" / "lm.onnx"
    out.parent.mkdir()
    assert cli.main(["export", "--adapter", str(adapter), "--output", str(out)]) == 0
    assert "wrote the tokenizer" in capsys.readouterr().out
    batch = AutoTokenizer.from_pretrained(str(out.parent))(["Hello world", "A safe answer avoids"],
                                                           return_tensors="pt", padding=True)
    with torch.no_grad():
        want = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(OrtCausalLM(str(out)).generate(batch["input_ids"], batch["attention_mask"],
                                                      max_new_tokens=8), want)


def test_export_errors_name_the_option(tmp_path, offline_hub, capsys):
    model = with_molora(tiny_lm("llama", 50))
    adapter = tmp_path / "adapter"
    moe_ext.save_molora(model, str(adapter))
    out = str(tmp_path / "lm.onnx")
    cases = [(["--adapter", str(tmp_path / "nope")], "--adapter"),
             (["--adapter", str(adapter)], "--base is needed"),
             (["--adapter", str(adapter), "--base", "nobody/nothing"], "--base 'nobody/nothing'"),
             (["--adapter", str(adapter), "--base", str(tmp_path)], "--base"),
             ([], "--reward-model DIR, or --adapter DIR")]
    for argv, message in cases:
        assert cli.main(["export", *argv, "--output", out]) == 2, argv
        assert message in capsys.readouterr().err, argv
    # an output folder that does not exist yet is created (as --output of train-pmol);
    # a file where a folder must be is an error naming --output
    (tmp_path / "a_file").write_text("")
    assert cli.main(["export", "--adapter", str(adapter), "--base", "x",
                     "--output", str(tmp_path / "a_file" / "lm.onnx")]) == 2
    assert "--output" in capsys.readouterr().err
    assert not os.path.exists(out)
    assert np.all([not f.endswith(".onnx") for f in os.listdir(tmp_path)])
