"""The shared preference loader (moe_ext.data): TRL's formats, the sources, errors naming
file, line and field; tokenisation with a chat template, plain text and truncation; the
built-in word tokenizer as a real HF tokenizer."""
import json

import pytest

from moe_ext import data, pmol
from moe_ext.reward import load_text_pairs

from hf_fixtures import bpe_tokenizer, transformers

MSG = [{"role": "user", "content": "hi there"}]
A = [{"role": "assistant", "content": "hello"}]
B = [{"role": "assistant", "content": "go away"}]


@pytest.mark.parametrize("row,want", [
    ({"prompt": "p", "chosen": " a", "rejected": " b"}, ("p", " a", " b")),
    ({"chosen": "the sky is blue", "rejected": "the sky is green"},   # implicit prompt
     ("the sky is", " blue", " green")),
    ({"prompt": MSG, "chosen": A, "rejected": B}, (MSG, A, B)),
    ({"chosen": MSG + A, "rejected": MSG + B}, (MSG, A, B)),          # implicit, conversational
])
def test_trl_formats(row, want):
    e = data.parse_row({**row, "preference": "safe"}, "f.jsonl:3")
    assert (e.prompt, e.chosen, e.rejected, e.preference) == (*want, "safe")


@pytest.mark.parametrize("row,message", [
    ({"prompt": "p", "chosen": "a"}, "f.jsonl:7: missing field 'rejected'"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "f.jsonl:7: field 'chosen' must be a string"),
    ({"prompt": "p", "chosen": A, "rejected": B}, "f.jsonl:7: field 'prompt' must be a list of messages"),
    ({"prompt": MSG, "chosen": [{"role": "assistant"}], "rejected": B},
     r"f.jsonl:7: field chosen\[0\].content must be a string"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "preference": [1]},
     "f.jsonl:7: field 'preference' must be a string"),
    ({"chosen": "same", "rejected": "same"}, "f.jsonl:7: without a 'prompt' field"),
])
def test_bad_rows_name_file_line_and_field(row, message):
    with pytest.raises(data.PreferenceDataError, match=message):
        data.parse_row(row, "f.jsonl:7")


def test_sources_jsonl_json_parquet_and_datasets(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": " yes", "rejected": " no", "pref": "a" if i % 2 else None}
            for i in range(4)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    want = data.load_preferences(str(tmp_path / "d.jsonl"), label_column="pref")
    assert [e.preference for e in want] == [None, "a", None, "a"]  # unlabelled rows allowed
    assert data.load_preferences(str(tmp_path / "d.json"), label_column="pref") == want
    (tmp_path / "bad.json").write_text(json.dumps(rows[:1] + [{"prompt": "x"}]))
    with pytest.raises(ValueError, match=r"bad.json row 1: missing field 'chosen'"):
        data.load_preferences(str(tmp_path / "bad.json"))
    with pytest.raises(FileNotFoundError, match="not found"):
        data.load_preferences(str(tmp_path / "nope.parquet"))
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "d.parquet"))
    assert data.load_preferences(str(tmp_path / "d.parquet"), label_column="pref") == want
    table.save_to_disk(str(tmp_path / "saved"))
    assert data.load_preferences(str(tmp_path / "saved"), label_column="pref") == want
    with pytest.raises(ValueError, match="no split 'test'"):
        datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "dd"))
        data.load_preferences(str(tmp_path / "dd"), split="test")


def test_chat_template_encoding_matches_the_rendering():
    tok = bpe_tokenizer()
    e = data.PreferenceExample(MSG, A, B, None)
    enc = data.encode_example(tok, e)
    assert tok.decode(enc.prompt_ids) == "<s><|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(enc.chosen_ids) == "hello<|im_end|>\n"
    assert tok.decode(enc.rejected_ids) == "go away<|im_end|>\n"
    standard = data.encode_example(tok, data.PreferenceExample("hi there", "hello", "go away"))
    assert standard == enc                      # a standard row is one user turn
    plain = data.encode_example(tok, data.PreferenceExample("hi there", " hello", " go away"),
                                chat_template=False)
    assert tok.decode(plain.prompt_ids) == "hi there"
    assert tok.decode(plain.chosen_ids) == " hello<|im_end|>"  # EOS ends a plain response
    assert data.encode_prompt(tok, "hi there") == enc.prompt_ids


def test_truncation_keeps_prompt_end_and_response_start():
    tok = bpe_tokenizer()
    e = data.PreferenceExample("apple river cloud stone music garden", " yes no maybe often", " no")
    full = data.encode_example(tok, e, chat_template=False)
    cut = data.encode_example(tok, e, max_length=6, max_prompt_length=3, chat_template=False)
    assert cut.prompt_ids == full.prompt_ids[-3:]
    assert cut.chosen_ids == full.chosen_ids[:3] and len(cut.rejected_ids) <= 3
    only_max = data.encode_example(tok, e, max_length=4, chat_template=False)
    assert only_max.prompt_ids == full.prompt_ids[-3:] and len(only_max.chosen_ids) == 1
    with pytest.raises(ValueError, match="max_prompt_length"):
        data.check_lengths(4, 4)
    with pytest.raises(ValueError, match="chat template"):
        no_template = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer)
        data.encode_example(no_template, data.PreferenceExample(MSG, A, B))


def test_word_tokenizer_is_a_real_hf_tokenizer(tmp_path):
    tok = pmol.synthetic_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(loaded, transformers.PreTrainedTokenizerFast)
    text = "explain apple river"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    e = data.PreferenceExample(text, "yes no", "no")
    enc = data.encode_example(loaded, e)        # <bos> prompt <sep> response <eos>
    assert loaded.convert_ids_to_tokens(enc.prompt_ids) == ["<bos>", "explain", "apple", "river", "<sep>"]
    assert loaded.convert_ids_to_tokens(enc.chosen_ids) == ["yes", "no", "<eos>"]


def test_train_rm_data_goes_through_the_shared_loader(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"question {i}"}],
             "chosen": [{"role": "assistant", "content": "a kind answer"}],
             "rejected": [{"role": "assistant", "content": "go away"}], "category": i % 2}
            for i in range(6)]
    path = tmp_path / "conv.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = load_text_pairs(str(path), "hashing")
    assert len(pairs) == 6 and pairs.label.tolist() == [0, 1] * 3
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "x", "chosen": 1}) + "\n")
    with pytest.raises(ValueError, match="conv.jsonl:2: missing field 'rejected'"):
        load_text_pairs(str(path), "hashing")
