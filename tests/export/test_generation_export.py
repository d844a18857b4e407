"""Generation graphs on onnxruntime (CPU provider) against transformers' generate on the same
PyTorch model: greedy tokens identical, logits within 1e-4 relative in fp32, steering as an
input, EOS stopping, fp16, the step API and its KV cache, and bad input."""
import copy

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("transformers")

import moe_ext  # noqa: E402
from moe_ext.export import KVCache, OrtCausalLM, OrtModel  # noqa: E402

from tiny_models import PROMPTS, bpe_tokenizer, export_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return bpe_tokenizer()


@pytest.fixture(scope="session")
def prompts(tokenizer):
    """A batch of 3 prompts of different lengths, left padded."""
    return tokenizer(PROMPTS, return_tensors="pt", padding=True)


@pytest.fixture(scope="session")
def graphs(tmp_path_factory, tokenizer):
    """graphs(arch) -> (model, OrtCausalLM) for "llama" or "qwen2": fp32, last-position
    logits, exported on first use."""
    made = {}

    def get(arch: str):
        if arch not in made:
            model, path = export_tiny(arch, tmp_path_factory.mktemp(arch), tokenizer)
            made[arch] = (model, OrtCausalLM(path))
        return made[arch]

    return get


@pytest.fixture(params=["llama", "qwen2"])
def exported(request, graphs):
    return graphs(request.param)


def rel_err(got, want) -> float:
    want = want.detach().float().numpy() if isinstance(want, torch.Tensor) else want
    return float(np.abs(got - want).max() / np.abs(want).max())


def hf_generate(model, prompts, steer=None, **kwargs):
    moe_ext.set_group_bias(model, steer)
    try:
        with torch.no_grad():
            return model.generate(**prompts, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True, pad_token_id=0, **kwargs)
    finally:
        moe_ext.set_group_bias(model, None)


@pytest.mark.parametrize("steer", [None, {"safe": 3.0, "concise": -1.0}], ids=["plain", "steered"])
def test_greedy_matches_transformers_generate(exported, prompts, steer):
    model, lm = exported
    assert (prompts["attention_mask"][:, 0] == 0).any()  # the batch really is left padded
    want = hf_generate(model, prompts, steer, max_new_tokens=32, eos_token_id=None)
    got = lm.generate(prompts["input_ids"], prompts["attention_mask"], max_new_tokens=32,
                      steer=steer, eos_token_id=[], output_logits=True,
                      return_dict_in_generate=True)
    assert isinstance(got.sequences, torch.Tensor) and got.sequences.shape == (3, prompts["input_ids"].shape[1] + 32)
    assert torch.equal(got.sequences, want.sequences)
    assert len(got.logits) == 32
    assert max(rel_err(g, w) for g, w in zip(got.logits, want.logits)) <= 1e-4


def test_steering_changes_the_output_and_works_per_row(exported, prompts):
    model, lm = exported
    ids, mask = prompts["input_ids"], prompts["attention_mask"]
    plain = lm(ids, mask).logits[:, -1]
    steer = [{"safe": 4.0}, {}, {"concise": 2.5}]
    rows = lm(ids, mask, group_bias=lm.group_bias(steer)).logits[:, -1]
    assert rel_err(rows[1], plain[1]) < 1e-6 and rel_err(rows[0], plain[0]) > 1e-3
    for b, bias in enumerate(steer):  # each row as PyTorch steered with set_group_bias
        moe_ext.set_group_bias(model, bias)
        with torch.no_grad():
            want = model(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits[0, -1]
        assert rel_err(rows[b], want) <= 1e-4
    moe_ext.set_group_bias(model, None)
    # the default group_bias (no input) is zeros: the same as an explicit zero bias
    zeros = lm(ids, mask, group_bias=np.zeros(2, np.float32)).logits[:, -1]
    assert np.array_equal(zeros, plain)


def test_eos_stops_rows_and_pads_like_transformers(exported, prompts):
    model, lm = exported
    S = prompts["input_ids"].shape[1]
    free = lm.generate(prompts["input_ids"], prompts["attention_mask"], max_new_tokens=12,
                       eos_token_id=[])
    # EOS: the first token that row 1 generates at step i >= 2 and not before
    i = next(i for i in range(2, 12) if int(free[1, S + i]) not in free[1, S:S + i].tolist())
    eos = int(free[1, S + i])
    want = hf_generate(model, prompts, max_new_tokens=12, eos_token_id=eos).sequences
    got = lm.generate(prompts["input_ids"], prompts["attention_mask"], max_new_tokens=12,
                      eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, want)
    assert int(got[1, S + i]) == eos and (got[1, S + i + 1:] == 0).all()
    # every row ends at its first token: the loop stops there
    first = [int(free[b, S]) for b in range(3)]
    short = lm.generate(prompts["input_ids"], prompts["attention_mask"], max_new_tokens=12,
                        eos_token_id=first)
    assert short.shape[1] == S + 1


def test_sampling_is_seeded_and_top_k_1_is_greedy(exported, prompts):
    _, lm = exported
    args = (prompts["input_ids"].numpy(), prompts["attention_mask"].numpy())
    a = lm.generate(*args, max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.9, seed=3)
    b = lm.generate(*args, max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.9, seed=3)
    c = lm.generate(*args, max_new_tokens=10, do_sample=True, temperature=1.5, top_k=0, seed=4)
    assert isinstance(a, np.ndarray) and np.array_equal(a, b) and not np.array_equal(a, c)
    greedy = lm.generate(*args, max_new_tokens=10)
    assert np.array_equal(lm.generate(*args, max_new_tokens=10, do_sample=True, top_k=1, seed=5), greedy)


def test_fp16_graph_all_logits_and_the_step_api(tmp_path, tokenizer, prompts):
    """fp16 error against the fp32 model about that of PyTorch's own fp16 model (a near tie
    in the top-K routing may flip a token's experts in either), KV cache in fp16, and
    prefill + two decode steps of 3 tokens through the cache equal to one full forward."""
    model, path = export_tiny("llama", tmp_path, tokenizer, dtype="float16", logits="all")
    lm = OrtCausalLM(path)
    ids, mask = prompts["input_ids"], prompts["attention_mask"]
    seq = lm.generate(ids, mask, max_new_tokens=6, eos_token_id=[])
    full_mask = torch.cat([mask, torch.ones(3, 6, dtype=mask.dtype)], 1)
    with torch.no_grad():
        want = model(input_ids=seq, attention_mask=full_mask).logits
        half = copy.deepcopy(model).half()(input_ids=seq, attention_mask=full_mask).logits.float()
    first = lm(ids, mask)
    assert first.logits.shape == (3, ids.shape[1], len(tokenizer))
    assert first.past_key_values.values[0].data_type() == "tensor(float16)"
    second = lm(seq[:, -6:-3], full_mask[:, :-3], past_key_values=first.past_key_values)
    third = lm(seq[:, -3:], full_mask, past_key_values=second.past_key_values)
    assert third.past_key_values.length == seq.shape[1]
    got = torch.from_numpy(np.concatenate([first.logits, second.logits, third.logits], axis=1))
    real = full_mask.bool()
    scale = want.abs().max()
    ort_err = ((got - want).abs().amax(-1) / scale)[real]      # per real position
    torch_err = ((half - want).abs().amax(-1) / scale)[real]
    assert ort_err.median() <= 2 * torch_err.median() and ort_err.median() < 2e-2
    assert (ort_err > 5e-2).float().mean() <= 0.1              # routing flips are rare


def test_step_api_bad_input_names_the_input(graphs):
    _, lm = graphs("llama")
    ids = np.array([[5, 6, 7]])
    with pytest.raises(ValueError, match="input_ids"):
        lm(ids.astype(np.float32))
    with pytest.raises(ValueError, match="attention_mask"):
        lm(ids, np.ones((1, 5), np.int64))
    with pytest.raises(ValueError, match="position_ids"):
        lm(ids, position_ids=np.zeros((1, 2), np.int64))
    with pytest.raises(ValueError, match="group_bias"):
        lm(ids, group_bias=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="unknown expert group 'kind'"):
        lm.generate(ids, steer={"kind": 1.0})
    with pytest.raises(ValueError, match="left padding"):
        lm.generate(ids, np.array([[1, 1, 0]]))
    with pytest.raises(ValueError, match="max_new_tokens"):
        lm.generate(ids, max_new_tokens=0)
    step = lm(ids)
    with pytest.raises(TypeError, match="past_key_value"):
        lm(ids, past_key_value=step.past_key_values)  # misnamed keyword
    with pytest.raises(ValueError, match="2 layers"):
        lm(ids, past_key_values=step.past_key_values.numpy()[:1])
    k, v = step.past_key_values.numpy()[0]
    bad = ((k[:, :1], v[:, :1]),) + step.past_key_values.numpy()[1:]
    with pytest.raises(ValueError, match="past_key_values.0.key .*another model"):
        lm(ids, np.ones((1, 6), np.int64), past_key_values=bad)
    # a cache from another model with the same cache layout is refused too
    _, other = graphs("qwen2")
    assert (other.num_layers, other.num_kv_heads, other.head_dim) == (lm.num_layers, lm.num_kv_heads, lm.head_dim)
    with pytest.raises(ValueError, match="another model"):
        other(ids, np.ones((1, 6), np.int64), past_key_values=step.past_key_values)
    assert isinstance(step.past_key_values, KVCache)
    # the raw session wrapper: missing and misnamed inputs, wrong dtype
    raw = OrtModel(lm.path)
    assert raw.optional_inputs == {"group_bias": raw.optional_inputs["group_bias"]}
    with pytest.raises(ValueError, match=r"missing \['past_key_values.0.key'"):
        raw(input_ids=ids, attention_mask=ids, position_ids=ids)
    with pytest.raises(ValueError, match=r"unknown \['input_id'\]"):
        raw(input_id=ids)
    with pytest.raises(ValueError, match="'attention_mask' must be int64, got float32"):
        raw(input_ids=ids, attention_mask=ids.astype(np.float32), position_ids=ids,
            **{n: np.zeros((1, 2, 0, 8), np.float32) for n in lm.past_names})


def test_pmol_generate_applies_only_its_flags_like_the_graph(graphs, tokenizer):
    """A base model's generation_config (here a strong repetition penalty and no repeated
    tokens) is not applied by pmol.generate: only GenerationOptions' flags are, as in the
    graph's loop, so both give the same text (transformers' own generate would differ)."""
    from moe_ext import pmol
    from moe_ext.cli.generate import generate_onnx

    model, lm = graphs("llama")
    options = pmol.GenerationOptions(max_new_tokens=12, chat_template=False)
    config = model.generation_config
    config.repetition_penalty, config.no_repeat_ngram_size = 20.0, 1
    try:
        text = pmol.generate(model, tokenizer, PROMPTS[1], options)
        assert model.generation_config is config  # put back after the call
        assert text == generate_onnx(lm.path, tokenizer, PROMPTS[1], options, {}, runtime="ort")["text"]
        ids = tokenizer(PROMPTS[1], return_tensors="pt")
        with torch.no_grad():  # transformers applies the model's config: another text
            inherited = model.generate(**ids, **options.generate_kwargs(tokenizer))
        assert tokenizer.decode(inherited[0, ids["input_ids"].shape[1]:],
                                skip_special_tokens=True).strip() != text
    finally:
        config.repetition_penalty, config.no_repeat_ngram_size = 1.0, 0
