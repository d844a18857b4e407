"""Exported folders on onnxruntime-genai (CPU build): the folder's files, greedy tokens equal
to transformers' generate on small Llama and Qwen2 PMoL models (left-padded batch, plain and
steered through set_model_input, a different mix per row), the same folder on OrtCausalLM,
`moe-ext export` + `moe-ext generate --onnx FOLDER` choosing genai, and bad input."""
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("transformers")
og = pytest.importorskip("onnxruntime_genai")

import moe_ext  # noqa: E402
from moe_ext import cli  # noqa: E402
from moe_ext.export import OrtCausalLM, OrtModel  # noqa: E402
from moe_ext.export.genai import GenaiCausalLM  # noqa: E402
from moe_ext.export.genai_config import CONFIG_NAME, export_folder  # noqa: E402

from tiny_models import PROMPTS, bpe_tokenizer, tiny_lm, with_molora  # noqa: E402

EOS, PAD = 2, 0
STEER = {"safe": 3.0, "concise": -1.0}


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    """folders(arch) -> (PyTorch model, exported folder), exported on first use."""
    made = {}

    def get(arch):
        if arch not in made:
            model = with_molora(tiny_lm(arch, len(tokenizer)))
            folder = str(tmp_path_factory.mktemp(f"genai-{arch}"))
            export_folder(model, folder, tokenizer)
            made[arch] = (model, folder)
        return made[arch]

    return get


def hf_rows(model, tokenizer, steer, max_new_tokens, rows=None):
    """transformers' greedy generate on the left-padded PROMPTS (or token id `rows`): per
    row, the unpadded prompt + the new tokens up to and including EOS."""
    batch = (tokenizer(PROMPTS, return_tensors="pt", padding=True) if rows is None else
             tokenizer.pad({"input_ids": rows}, return_tensors="pt"))
    moe_ext.set_group_bias(model, steer)
    try:
        with torch.no_grad():
            out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=EOS, pad_token_id=PAD)
    finally:
        moe_ext.set_group_bias(model, None)
    S = batch["input_ids"].shape[1]
    out_rows = []
    for i in range(batch["input_ids"].shape[0]):
        prompt = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
        new = out[i, S:].tolist()
        if EOS in new:
            new = new[:new.index(EOS) + 1]
        out_rows.append(prompt + new)
    return out_rows


def test_folder_holds_what_genai_reads(folders, tokenizer):
    _, folder = folders("llama")
    assert {"model.onnx", CONFIG_NAME, "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(folder))
    config = json.load(open(os.path.join(folder, CONFIG_NAME)))
    decoder = config["model"]["decoder"]
    assert config["model"]["type"] == "decoder" and decoder["filename"] == "model.onnx"
    assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]) == (2, 2, 8)
    assert (config["model"]["eos_token_id"], config["model"]["pad_token_id"]) == (EOS, PAD)
    assert config["model"]["context_length"] == 128 and config["search"]["do_sample"] is False
    # genai's own tokenizer reads the saved files and agrees with transformers'
    lm = GenaiCausalLM(folder)
    assert lm.provider == "cpu" and lm.groups == ["concise", "safe"]
    text = PROMPTS[1]
    assert list(lm.tokenizer().encode(text)) == tokenizer(text)["input_ids"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("steer", [None, STEER], ids=["plain", "steered"])
def test_greedy_equals_transformers_generate(folders, tokenizer, arch, steer):
    model, folder = folders(arch)
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    got = GenaiCausalLM(folder).generate(ids, max_new_tokens=24, steer=steer)
    assert got == hf_rows(model, tokenizer, steer, 24)


def test_an_equal_length_batch_runs_as_one_and_equals_transformers(folders, tokenizer):
    model, folder = folders("qwen2")
    long = tokenizer(PROMPTS[1])["input_ids"]
    rows = [long[:6], long[-6:], tokenizer(PROMPTS[2])["input_ids"][:6]]
    for steer in (None, [STEER, {}, {"concise": 2.0}]):
        want = [hf_rows(model, tokenizer, s, 16, [r])[0]
                for r, s in zip(rows, steer or [None] * 3)]
        assert GenaiCausalLM(folder).generate(rows, max_new_tokens=16, steer=steer) == want


def test_steering_changes_the_text_and_goes_per_row(folders, tokenizer):
    model, folder = folders("llama")
    lm = GenaiCausalLM(folder)
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    plain = lm.generate(ids, max_new_tokens=16)
    steered = lm.generate(ids, max_new_tokens=16, steer=STEER)
    assert plain != steered
    mixed = lm.generate(ids, max_new_tokens=16, steer=[{}, STEER, {}])
    assert mixed == [plain[0], steered[1], plain[2]]
    # the streamed tokens are generate's
    assert list(lm.stream(ids[1], max_new_tokens=16, steer=STEER)) == steered[1][len(ids[1]):]


def test_the_folder_graph_runs_on_ort_causal_lm_too(folders, tokenizer):
    """export_folder's graph takes group_bias as a required input (for genai); OrtCausalLM
    feeds zeros when not steering, and both runtimes agree."""
    model, folder = folders("qwen2")
    lm = OrtCausalLM(os.path.join(folder, "model.onnx"))
    assert lm.required_group_bias and lm.provider == "CPUExecutionProvider"
    assert OrtModel(os.path.join(folder, "model.onnx")).provider == "CPUExecutionProvider"
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    genai = GenaiCausalLM(folder)
    for steer in (None, STEER):
        want = genai.generate([ids[0]], max_new_tokens=12, steer=steer)[0]
        got = lm.generate(np.asarray([ids[0]]), max_new_tokens=12, steer=steer, eos_token_id=EOS)
        got = got[0].tolist()
        assert got[:len(want)] == want


def test_sampling_is_seeded(folders, tokenizer):
    _, folder = folders("llama")
    lm = GenaiCausalLM(folder)
    ids = [tokenizer(PROMPTS[0])["input_ids"]]
    a = lm.generate(ids, max_new_tokens=12, do_sample=True, temperature=1.5, top_k=300, seed=3)
    b = lm.generate(ids, max_new_tokens=12, do_sample=True, temperature=1.5, top_k=300, seed=3)
    assert a == b


def test_bad_input_is_named(folders, tokenizer, tmp_path):
    _, folder = folders("llama")
    lm = GenaiCausalLM(folder)
    ids = [tokenizer(PROMPTS[0])["input_ids"]]
    with pytest.raises(ValueError, match="unknown expert group 'kind'"):
        lm.generate(ids, steer={"kind": 1.0})
    with pytest.raises(ValueError, match="max_new_tokens"):
        lm.generate(ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="non-empty"):
        lm.generate([[]])
    with pytest.raises(ValueError, match="exceeds the model's context length 128"):
        lm.generate(ids, max_new_tokens=128)
    with pytest.raises(ValueError, match="steer lists 2 rows for a batch of 1"):
        lm.generate(ids, steer=[STEER, STEER])
    with pytest.raises(ValueError, match="provider must be"):
        GenaiCausalLM(folder, provider="tpu")
    if not og.is_cuda_available():
        with pytest.raises(ValueError, match="no CUDA"):
            GenaiCausalLM(folder, provider="cuda")
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        GenaiCausalLM(str(tmp_path))


def test_a_graph_whose_steering_has_a_default_is_refused(folders, tokenizer, tmp_path):
    """genai ignores set_model_input for an input with a default (steering would silently
    do nothing), so export_causal_lm's default graph gets no genai_config, and a folder
    holding one is refused."""
    import shutil

    from moe_ext.export import export_causal_lm
    from moe_ext.export.genai_config import write_genai_config

    model, folder = folders("llama")
    path = export_causal_lm(model, str(tmp_path / "model.onnx"))  # optional group_bias
    with pytest.raises(ValueError, match="ignores set_model_input"):
        write_genai_config(model, path)
    shutil.copy(os.path.join(folder, CONFIG_NAME), tmp_path / CONFIG_NAME)
    with pytest.raises(ValueError, match="group_bias has a default value"):
        GenaiCausalLM(str(tmp_path))


def test_cli_export_folder_then_generate_on_genai_and_ort(tokenizer, tmp_path, capsys):
    """`moe-ext export --adapter A --output FOLDER` writes the genai folder; `moe-ext generate
    --onnx FOLDER` runs genai by default, gives the --adapter text (steered), and --runtime
    ort gives the same."""
    adapter = tmp_path / "adapter"
    base = tiny_lm("llama", len(tokenizer))  # seeded: the same weights as under `lora`
    base.save_pretrained(str(tmp_path / "base"))
    tokenizer.save_pretrained(str(tmp_path / "base"))
    lora = with_molora(tiny_lm("llama", len(tokenizer)))
    moe_ext.save_molora(lora, str(adapter))
    out = tmp_path / "deploy"
    assert cli.main(["export", "--adapter", str(adapter), "--base", str(tmp_path / "base"),
                     "--output", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["output"] == str(out / "model.onnx") and result["folder"] == str(out)
    assert {CONFIG_NAME, "model.onnx", "tokenizer.json"} <= set(os.listdir(out))
    common = ["--prompt", PROMPTS[1], "--steer", "safe=3", "--max-new-tokens", "10",
              "--no-chat-template", "--json"]
    runs = {}
    for name, source in (("adapter", ["--adapter", str(adapter), "--base", str(tmp_path / "base")]),
                         ("genai", ["--onnx", str(out)]),
                         ("ort", ["--onnx", str(out / "model.onnx"), "--runtime", "ort"])):
        assert cli.main(["generate", *source, *common]) == 0, capsys.readouterr().err
        runs[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert runs["genai"]["runtime"] == "genai" and runs["genai"]["provider"] == "cpu"
    assert runs["ort"]["runtime"] == "ort" and runs["ort"]["provider"] == "CPUExecutionProvider"
    assert runs["adapter"]["text"] == runs["genai"]["text"] == runs["ort"]["text"] != ""
    assert cli.main(["generate", "--onnx", str(tmp_path / "nowhere"), "--prompt", "x"]) == 2
    assert "--onnx" in capsys.readouterr().err
    assert cli.main(["generate", "--adapter", str(adapter), "--prompt", "x", "--runtime", "ort"]) == 2
    assert "--runtime" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:Specified provider")  # onnxruntime's own, about the fake
def test_a_provider_that_cannot_start_is_reported(folders, monkeypatch):
    """onnxruntime-gpu lists CUDA even where it cannot start; onnxruntime then runs on the
    CPU without a word (at our log level). OrtModel / OrtCausalLM warn and `.provider` says
    what runs. (Here CUDA is faked into the CPU build's list.)"""
    import onnxruntime

    _, folder = folders("llama")
    listed = onnxruntime.get_available_providers()
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", *listed])
    with pytest.warns(UserWarning, match=r"\['CUDAExecutionProvider'\] could not start; running on CPUExecutionProvider"):
        lm = OrtCausalLM(os.path.join(folder, "model.onnx"))
    assert lm.provider == "CPUExecutionProvider" and lm.device == "cpu"
