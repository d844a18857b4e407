"""A steerable adapter's preference mix through its generation graph (the preference_weights
input, groups in sorted order while the adapter lists them otherwise): greedy tokens and one
step's logits equal PyTorch's under preference_mix on onnxruntime (OrtCausalLM), on
onnxruntime-genai (GenaiCausalLM, the folder of `moe-ext export --adapter`) and through
`moe-ext generate --onnx --mix`; no mix fed equals no mix; bad mixes and a mix for a graph
that is not steerable are named errors."""
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("transformers")

import moe_ext  # noqa: E402
from moe_ext import cli, pmol  # noqa: E402
from moe_ext.export import OrtCausalLM, export_causal_lm  # noqa: E402
from moe_ext.export.genai import genai_available  # noqa: E402
from moe_ext.export.genai_config import export_folder  # noqa: E402
from moe_ext.molora import preference_mix  # noqa: E402

from tiny_models import PROMPTS, bpe_tokenizer, tiny_lm, with_molora  # noqa: E402

# the config lists (verbose, concise); the graph's inputs take (concise, verbose)
MIXES = [{"verbose": 1.0}, {"concise": 1.0, "verbose": 1.0}, {"concise": 0.2, "verbose": 0.8}]
BAD = [({"concise": -0.5, "verbose": 1.0}, ">= 0"), ({"concise": 0.0}, "must not all be zero"),
       ({"kind": 1.0}, r"unknown groups \['kind'\]"),
       ({"concise": float("nan")}, "finite number")]
EOS = 2
needs_genai = pytest.mark.skipif(not genai_available(), reason="onnxruntime-genai not installed")


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


@pytest.fixture(scope="module")
def steerable(tmp_path_factory, tokenizer):
    """(PyTorch model, OrtCausalLM of export_causal_lm's graph (optional steering inputs),
    the folder `moe-ext export --adapter` writes from its saved adapter (required inputs,
    for genai)) of one steerable tiny Llama."""
    model = with_molora(tiny_lm("llama", len(tokenizer)), steerable=True)
    root = tmp_path_factory.mktemp("mix")
    lm = OrtCausalLM(export_causal_lm(model, str(root / "lm.onnx")))
    tiny_lm("llama", len(tokenizer)).save_pretrained(str(root / "base"))  # seeded: model's base
    tokenizer.save_pretrained(str(root / "base"))
    moe_ext.save_molora(model, str(root / "adapter"))
    assert cli.main(["export", "--adapter", str(root / "adapter"), "--base", str(root / "base"),
                     "--output", str(root / "folder")]) == 0
    return model, lm, str(root / "folder")


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return tokenizer(PROMPTS, return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tokenizer):
    """export_folder's folder of a tiny Llama whose adapter is not steerable."""
    folder = str(tmp_path_factory.mktemp("plain"))
    export_folder(with_molora(tiny_lm("llama", len(tokenizer))), folder, tokenizer)
    return folder


def torch_generate(model, prompts, mix, max_new_tokens=12, eos_token_id=None):
    """transformers' greedy generate under the preference mix `mix`."""
    with torch.no_grad(), preference_mix(model, mix):
        return model.generate(**prompts, do_sample=False, max_new_tokens=max_new_tokens,
                              eos_token_id=eos_token_id, pad_token_id=0)


def test_the_graph_takes_the_mix_in_sorted_group_order(steerable):
    model, lm, _ = steerable
    assert list(model.molora_config.expert_groups) == ["verbose", "concise"]
    assert lm.groups == ["concise", "verbose"] and lm.steerable
    assert lm.metadata["moe_ext.steerable"] == "true"
    names = [i.name for i in lm.session.get_overridable_initializers()]
    assert names == ["group_bias", "preference_weights"]  # optional: zeros by default
    np.testing.assert_allclose(lm.preference_weights([MIXES[2], None]), [[0.2, 0.8], [0, 0]],
                               rtol=1e-6)


def test_greedy_tokens_equal_pytorch_for_each_mix_and_differ_between_mixes(steerable, prompts):
    model, lm, _ = steerable
    outs = []
    for mix in MIXES:
        want = torch_generate(model, prompts, mix)
        got = lm.generate(prompts["input_ids"], prompts["attention_mask"], max_new_tokens=12,
                          mix=mix, eos_token_id=[])
        assert torch.equal(got, want), mix
        outs.append(got)
    assert not torch.equal(outs[0], outs[2]) and not torch.equal(outs[1], outs[2])
    # the mix per row: each row as it is alone
    rows = lm.generate(prompts["input_ids"], prompts["attention_mask"], max_new_tokens=12,
                       mix=[MIXES[0], None, MIXES[2]], eos_token_id=[])
    plain = lm.generate(prompts["input_ids"], prompts["attention_mask"], max_new_tokens=12,
                        eos_token_id=[])
    assert torch.equal(rows[0], outs[0][0]) and torch.equal(rows[2], outs[2][2])
    assert torch.equal(rows[1], plain[1])


def test_one_step_logits_and_the_default_equal_pytorch(steerable, prompts):
    model, lm, _ = steerable
    ids, mask = prompts["input_ids"], prompts["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    for mix in (None, MIXES[2]):
        with torch.no_grad(), preference_mix(model, mix):
            want = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        got = lm(ids, mask, preference_weights=lm.preference_weights(mix)).logits[:, -1]
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)
    # nothing fed (the default) = zero rows = no mix
    zeros = lm(ids, mask, preference_weights=np.zeros((1, 2), np.float32)).logits
    assert np.array_equal(lm(ids, mask).logits, zeros)


def test_bad_mixes_are_named_errors(steerable, plain, prompts):
    _, lm, _ = steerable
    ids = prompts["input_ids"]
    for mix, words in BAD:
        with pytest.raises(ValueError, match=f"mix.*{words}"):
            lm.generate(ids, mix=mix)
    with pytest.raises(ValueError, match="give mix or steer, not both"):
        lm.generate(ids, mix=MIXES[0], steer={"concise": 1.0})
    with pytest.raises(ValueError, match="mix lists 2 rows for a batch of 3"):
        lm.generate(ids, mix=[MIXES[0], MIXES[1]])
    with pytest.raises(ValueError, match="mix must be a dict"):
        lm.generate(ids, mix="concise=1")
    with pytest.raises(ValueError, match=r"preference_weights must have shape \(2,\)"):
        lm(ids, preference_weights=np.ones(3, np.float32))
    # a graph that is not steerable takes no mix
    other = OrtCausalLM(os.path.join(plain, "model.onnx"))
    assert not other.steerable and "preference_weights" not in other.specs
    with pytest.raises(ValueError, match="mix: this graph's routers take no preference mix"):
        other.generate(ids, mix={"safe": 1.0})
    with pytest.raises(ValueError, match="takes no preference_weights input"):
        other(ids, preference_weights=np.ones(2, np.float32))


@needs_genai
def test_genai_generates_pytorch_tokens_for_each_mix(steerable, tokenizer):
    from moe_ext.export.genai import GenaiCausalLM

    model, _, folder = steerable
    genai = GenaiCausalLM(folder)
    assert genai.steerable and genai.groups == ["concise", "verbose"]
    rows = [tokenizer(p)["input_ids"] for p in PROMPTS]
    outs = []
    for mix in MIXES:
        # one row at a time, unpadded (as genai runs rows of different lengths); up to EOS
        want = [torch_generate(model, {"input_ids": torch.tensor([r])}, mix, 12, EOS)[0].tolist()
                for r in rows]
        got = genai.generate(rows, max_new_tokens=12, mix=mix)
        assert got == want, mix
        outs.append(got)
    assert outs[0] != outs[2] and outs[1] != outs[2]
    assert list(genai.stream(rows[1], max_new_tokens=12, mix=MIXES[2])) == outs[2][1][len(rows[1]):]
    for mix, words in BAD:
        with pytest.raises(ValueError, match=f"mix.*{words}"):
            genai.generate(rows[:1], mix=mix)
    with pytest.raises(ValueError, match="give mix or steer, not both"):
        genai.generate(rows[:1], mix=MIXES[0], steer={"concise": 1.0})


def test_cli_generate_onnx_with_mix_gives_the_pytorch_text(steerable, tokenizer, capsys):
    model, _, folder = steerable
    options = pmol.GenerationOptions(max_new_tokens=10, chat_template=False)
    want = pmol.generate(model, tokenizer, PROMPTS[1], options, mix={"concise": 0.2, "verbose": 0.8})
    plain = pmol.generate(model, tokenizer, PROMPTS[1], options)
    assert want != plain
    common = ["generate", "--onnx", folder, "--prompt", PROMPTS[1], "--max-new-tokens", "10",
              "--no-chat-template", "--json", "--mix", "concise=0.2,verbose=0.8"]
    for runtime in ["ort"] + (["genai"] if genai_available() else []):
        assert cli.main([*common, "--runtime", runtime]) == 0, capsys.readouterr().err
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert out["runtime"] == runtime and out["text"] == want
        assert out["mix"] == {"concise": 0.2, "verbose": 0.8}
    for words, mix in (("unknown groups", "kind=1"), ("all be zero", "concise=0"),
                       ("finite number >= 0", "concise=-1")):
        assert cli.main([*common[:-1], mix, "--runtime", "ort"]) == 2
        err = capsys.readouterr().err
        assert "--mix" in err and words in err, err
    assert cli.main([*common, "--steer", "concise=1"]) == 2
    assert "not both" in capsys.readouterr().err


def test_cli_mix_on_a_graph_that_is_not_steerable_is_refused(plain, capsys):
    assert cli.main(["generate", "--onnx", plain, "--prompt", "hi", "--runtime", "ort",
                     "--mix", "safe=1"]) == 2
    assert "--mix: this graph's routers take no preference mix" in capsys.readouterr().err
