"""Bad command lines, run in-process through moe_ext.cli.main: each must exit with status 2
and one message naming the option, file or line at fault, never a traceback. The
command lines are cheap (tiny sizes) so that even a bad option that slipped through
would fail fast."""
import json
import os

import pytest

from moe_ext import cli

PMOL = ["train-pmol", "--synthetic", "--synthetic-size", "4", "--steps", "1", "--hidden", "8",
        "--layers", "1", "--batch-size", "2", "--no-progress", "--output", "{tmp}/pmol"]
RM = ["train-rm", "--synthetic", "--synthetic-pairs", "60", "--epochs", "1", "--no-progress",
      "--output", "{tmp}/rm"]
ADAPT = ["adapt", "--model", "{rm_dir}", "--synthetic-user", "0"]
GEN = ["generate", "--adapter", "{adapter}", "--prompt", "hi"]
BENCH = ["bench", "--tokens", "8", "--features", "8", "--experts", "4", "--rank", "2",
         "--reps", "1", "--cpu"]
ORT = ["ort-run", "{onnx}"]

# (command line, what the message must name)
TABLE = [
    (PMOL + ["--batch-size", "0"], "--batch-size"),
    (PMOL + ["--steps", "0"], "--steps"),
    (PMOL + ["--lr", "nan"], "--lr"),
    (PMOL + ["--lr", "0"], "--lr"),
    (PMOL + ["--lr", "-1"], "--lr"),
    (PMOL + ["--lr", "inf"], "--lr"),
    (PMOL + ["--hidden", "0"], "--hidden"),
    (PMOL + ["--layers", "0"], "--layers"),
    (PMOL + ["--eval-fraction", "1.0"], "--eval-fraction"),
    (PMOL + ["--eval-fraction", "-0.5"], "--eval-fraction"),
    (PMOL + ["--rank", "0"], "--rank"),
    (PMOL + ["--top-k", "0"], "--top-k"),
    (PMOL + ["--top-k", "99"], "--top-k"),
    (PMOL + ["--experts-per-group", "0"], "--experts-per-group"),
    (PMOL + ["--null-experts", "-1"], "--null-experts"),
    (PMOL + ["--alpha", "nan"], "--alpha"),
    (PMOL + ["--beta", "-1"], "--beta"),
    (PMOL + ["--label-smoothing", "1.5"], "--label-smoothing"),
    (PMOL + ["--grad-accum", "0"], "--grad-accum"),
    (PMOL + ["--checkpoint-every", "0"], "--checkpoint-every"),
    (PMOL + ["--synthetic-size", "0"], "--synthetic-size"),
    (PMOL + ["--group-loss-coef", "-1"], "--group-loss-coef"),
    (PMOL + ["--aux-loss-coef", "nan"], "--aux-loss-coef"),
    (PMOL + ["--max-length", "0"], "--max-length"),
    (PMOL + ["--target-modules", "(unclosed"], "--target-modules"),
    (PMOL + ["--target-modules", "no_such_module"], "--target-modules"),
    (PMOL + ["--target-modules", "(.*)*x"], "--target-modules"),  # hours of backtracking
    (PMOL + ["--output", "{afile}/out"], "--output"),
    (PMOL + ["--init-adapter", "{tmp}/missing"], "--init-adapter"),
    (PMOL + ["--init-adapter", "{bad_adapter}"], "adapter_config.json"),
    (PMOL + ["--resume", "--output", "{bad_ckpt_out}"], "trainer_state.json"),
    (["train-pmol", "--data", "{list_rows}", "--steps", "1", "--no-progress"], "list_rows.jsonl:1"),
    (["train-pmol", "--data", "{null_rows}", "--steps", "1", "--no-progress"], "null_rows.jsonl:1"),
    (["train-pmol", "--data", "{huge_line}", "--steps", "1", "--no-progress"], "huge.jsonl:2"),
    (["train-pmol", "--data", "{tmp}/missing.jsonl", "--steps", "1"], "missing.jsonl"),
    (RM + ["--test-fraction", "1.0"], "--test-fraction"),
    (RM + ["--test-fraction", "0"], "--test-fraction"),
    (RM + ["--experts", "0"], "--experts"),
    (RM + ["--top-k", "0"], "--top-k"),
    (RM + ["--top-k", "9", "--experts", "2"], "--top-k"),
    (RM + ["--batch-size", "0"], "--batch-size"),
    (RM + ["--lr", "nan"], "--lr"),
    (RM + ["--epochs", "0"], "--epochs"),
    (RM + ["--synthetic-pairs", "0"], "--synthetic-pairs"),
    (RM + ["--expert-hidden", "0"], "--expert-hidden"),
    (RM + ["--sparsity-coef", "nan"], "--sparsity-coef"),
    (RM + ["--max-length", "0"], "--max-length"),
    (RM + ["--molora-experts", "-1"], "--molora-experts"),
    (RM + ["--output", "{afile}/out"], "--output"),
    (["train-rm", "--data", "{list_rows}", "--epochs", "1", "--no-progress",
      "--output", "{tmp}/rm2"], "list_rows.jsonl:1"),
    (ADAPT[:2] + ["{tmp}/missing"] + ADAPT[3:], "--model"),
    (ADAPT + ["--pairs", "0"], "--pairs"),
    (ADAPT + ["--eta", "nan"], "--eta"),
    (ADAPT + ["--beta", "inf"], "--beta"),
    (ADAPT[:4] + ["-1"], "--synthetic-user"),
    (ADAPT + ["--output", "{afile}/user.json"], "--output"),
    (["adapt", "--model", "{bad_rm}", "--synthetic-user", "0"], "reward_config.json"),
    (["generate", "--adapter", "{tmp}/missing", "--prompt", "hi"], "--adapter"),
    (GEN + ["--max-new-tokens", "0"], "--max-new-tokens"),
    (GEN + ["--temperature", "nan"], "--temperature"),
    (GEN + ["--top-p", "1.5"], "--top-p"),
    (GEN + ["--top-k", "0"], "--top-k"),
    (GEN + ["--steer", "safe"], "--steer"),
    (["generate", "--adapter", "{bad_adapter}", "--prompt", "hi"], "adapter_config.json"),
    (["generate", "--onnx", "{tmp}/missing.onnx", "--prompt", "hi"], "--onnx"),
    (["generate", "--onnx", "{afile}", "--base", "{adapter}", "--prompt", "hi"], "--base"),
    (GEN + ["--provider", "CPUExecutionProvider"], "--provider"),
    (["convert", "--from-peft", "{tmp}/missing", "--output", "{tmp}/c"], "--from-peft"),
    (["convert", "--from-peft-groups", "a={tmp}/x", "--experts-per-group", "0",
      "--output", "{tmp}/c"], "--experts-per-group"),
    (["convert", "--from-peft-groups", "a={tmp}/x", "--top-k", "0", "--output", "{tmp}/c"],
     "--top-k"),
    (["convert", "--from-peft-groups", "a={tmp}/x", "--null-experts", "-1",
      "--output", "{tmp}/c"], "--null-experts"),
    (["convert", "--from-peft-groups", "novalue", "--output", "{tmp}/c"], "--from-peft-groups"),
    (["export", "--adapter", "{tmp}/missing", "--output", "{tmp}/m.onnx"], "--adapter"),
    (["export", "--reward-model", "{tmp}/missing", "--output", "{tmp}/m.onnx"], "--reward-model"),
    (["export", "--reward-model", "{bad_rm}", "--output", "{tmp}/m.onnx"], "reward_config.json"),
    (["export", "--adapter", "{adapter}", "--no-cache", "--length", "0",
      "--output", "{tmp}/m.onnx"], "--length"),
    (["export", "--reward-model", "{rm_dir}", "--output", "{afile}/m.onnx"], "--output"),
    (["export", "--reward-model", "{rm_dir}", "--no-cache", "--output", "{tmp}/m.onnx"],
     "--no-cache"),
    (["export", "--adapter", "{adapter}", "--no-cache", "--logits", "all",
      "--output", "{tmp}/m.onnx"], "--logits"),
    (["export", "--adapter", "{adapter}", "--length", "4", "--output", "{tmp}/m.onnx"],
     "--length"),
    (GEN[:1] + ["--onnx", "{afile}", "--dtype", "float16", "--prompt", "hi"], "--dtype"),
    (["ort-run", "{tmp}/missing.onnx"], "missing.onnx"),
    (["ort-run", "{afile}"], "a_file"),
    (ORT + ["--batch", "0"], "--batch"),
    (ORT + ["--length", "0"], "--length"),
    (ORT + ["--repeat", "-1"], "--repeat"),
    (BENCH + ["--tokens", "0"], "--tokens"),
    (BENCH + ["--rank", "0"], "--rank"),
    (BENCH + ["--top-k", "0"], "--top-k"),
    (BENCH + ["--experts", "0"], "--experts"),
    (BENCH + ["--reps", "0"], "--reps"),
    (["demo", "--output", "{afile}/demo"], "--output"),
    # absurd sizes: refused at parse time, never minutes of work or a traceback (issue 30)
    (PMOL + ["--batch-size", "1000000000"], "--batch-size"),
    (PMOL + ["--steps", str(10 ** 12)], "--steps"),
    (PMOL + ["--grad-accum", str(10 ** 9)], "--grad-accum"),
    (PMOL + ["--synthetic-size", str(10 ** 12)], "--synthetic-size"),
    (PMOL + ["--hidden", str(10 ** 9)], "--hidden"),
    (PMOL + ["--layers", str(10 ** 6)], "--layers"),
    (PMOL + ["--rank", str(10 ** 9)], "--rank"),
    (PMOL + ["--experts-per-group", str(10 ** 9)], "--experts-per-group"),
    (PMOL + ["--null-experts", str(10 ** 9)], "--null-experts"),
    (PMOL + ["--max-length", str(10 ** 12)], "--max-length"),
    (PMOL + ["--seed", str(10 ** 30)], "--seed"),
    (PMOL + ["--checkpoint-every", str(10 ** 30)], "--checkpoint-every"),
    (RM + ["--synthetic-pairs", str(10 ** 12)], "--synthetic-pairs"),
    (RM + ["--batch-size", str(10 ** 12)], "--batch-size"),
    (RM + ["--expert-hidden", str(10 ** 9)], "--expert-hidden"),
    (RM + ["--experts", str(10 ** 9)], "--experts"),
    (RM + ["--epochs", str(10 ** 12)], "--epochs"),
    (RM + ["--seed", str(2 ** 64)], "--seed"),
    (RM + ["--max-length", str(10 ** 12)], "--max-length"),
    (ADAPT + ["--pairs", str(10 ** 12)], "--pairs"),
    (ADAPT[:4] + [str(10 ** 12)], "--synthetic-user"),
    (GEN + ["--max-new-tokens", str(10 ** 12)], "--max-new-tokens"),
    (GEN + ["--seed", str(10 ** 30)], "--seed"),
    (ORT + ["--batch", str(10 ** 9)], "--batch"),
    (ORT + ["--length", str(10 ** 12)], "--length"),
    (ORT + ["--repeat", str(10 ** 12)], "--repeat"),
    (BENCH + ["--tokens", str(10 ** 12)], "--tokens"),
    (BENCH + ["--features", str(10 ** 9)], "--features"),
    (["convert", "--from-peft-groups", "a={tmp}/x", "--seed", str(10 ** 30),
      "--output", "{tmp}/c"], "--seed"),
    (["export", "--adapter", "{adapter}", "--no-cache", "--length", str(10 ** 12),
      "--output", "{tmp}/m.onnx"], "--length"),
    # --split is for datasets folders and names; a file has no splits
    (["train-pmol", "--data", "{rows}", "--split", "test", "--steps", "1"], "--split"),
    (PMOL + ["--split", "test"], "--split"),
    # an export never writes into the folders it reads (it destroyed the model it read)
    (["export", "--reward-model", "{rm_dir}", "--output", "{rm_dir}/reward_model.safetensors"],
     "--output"),
    (["export", "--reward-model", "{rm_dir}", "--output", "{rm_dir}/sub/m.onnx"], "--output"),
    (["export", "--adapter", "{adapter}", "--base", "x", "--output", "{adapter}/m.onnx"],
     "--output"),
    (["export", "--reward-model", "{rm_dir}", "--output", "{tmp}/m.txt"], "--output"),
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """Files the table refers to: bad data files, corrupt artefacts, and a plain file
    (a_file) that an --output cannot be written under."""
    tmp = tmp_path_factory.mktemp("bad_input")
    p = {"tmp": str(tmp)}

    def write(name, text):
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return str(path)

    row = {"prompt": "p", "chosen": "a", "rejected": "b", "preference": "x"}
    p["afile"] = write("a_file", "not a folder")
    p["rows"] = write("rows.jsonl", json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    p["list_rows"] = write("list_rows.jsonl", '["p", "a", "b"]\n')
    p["null_rows"] = write("null_rows.jsonl", "null\n")
    p["huge_line"] = write("huge.jsonl", json.dumps(row) + "\n" + '{"prompt": "' +
                           "x" * (17 << 20) + '"}\n')
    p["bad_adapter"] = write("bad_adapter/adapter_config.json",
                             '{"format_version": 1, "moe_ext_config": {"num_experts": "abc"}}')
    p["bad_adapter"] = os.path.dirname(p["bad_adapter"])
    write("bad_adapter/adapter_model.safetensors", "garbage: the config is checked first")
    p["bad_rm"] = os.path.dirname(write("bad_rm/reward_config.json", "{not json"))
    write("bad_rm/reward_model.safetensors", "garbage")
    p["bad_ckpt_out"] = str(tmp / "ckpt_out")
    write("ckpt_out/checkpoint/trainer_state.json", '{"step": 1, "tensors": "../../a_file"}')
    # well-formed artefacts for the commands whose options are checked after a load would be
    # cheap anyway: their files only need to exist (the options fail first)
    p["rm_dir"] = os.path.dirname(write("rm_dir/reward_config.json", "{}"))
    p["adapter"] = os.path.dirname(write("adapter/adapter_config.json", "{}"))
    p["onnx"] = write("model.onnx", "not onnx")
    return p


def run_cli(argv):
    """(exit status, stderr, the exception that escaped main or None)."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = cli.main(argv)
        except SystemExit as exit_:  # argparse's errors
            status = exit_.code
        except Exception as exc:  # noqa: BLE001 -- the failure this test looks for
            return 1, err.getvalue(), exc
    return status, err.getvalue(), None


@pytest.mark.parametrize("argv,named", TABLE, ids=[" ".join(a[-3:]) for a, _ in TABLE])
def test_bad_command_line_exits_2_naming_the_culprit(paths, argv, named):
    argv = [a.format(**paths) for a in argv]
    status, err, exc = run_cli(argv)
    assert exc is None, f"{type(exc).__name__}: {exc}"
    assert status == 2, err
    assert "Traceback" not in err
    assert named in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_table_covers_every_command():
    commands = {argv[0] for argv, _ in TABLE}
    assert commands >= {"train-pmol", "train-rm", "adapt", "generate", "convert", "export",
                        "ort-run", "bench", "demo"}
    assert len(TABLE) >= 40


@pytest.mark.parametrize("argv,module,extra", [
    (["demo", "--quick", "--output", "{tmp}/demo"], "tokenizers", "hf"),
    (PMOL, "transformers", "hf"),
    (["train-pmol", "--data", "{tmp}/rows.parquet", "--steps", "1"], "pyarrow", "data"),
    (["export", "--reward-model", "{rm_dir}", "--output", "{tmp}/m.onnx"], "onnxruntime", "onnx"),
    (GEN, "transformers", "hf"),
    (ORT, "onnxruntime", "onnx"),
])
def test_a_missing_extra_is_named_before_any_work(paths, monkeypatch, argv, module, extra):
    """Each command checks the optional packages it needs before working (`demo --quick`
    ran 68 s before saying tokenizers was missing), naming them and the pip extra."""
    import importlib.util
    import time

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == module else real(name, *a))
    start = time.perf_counter()
    status, err, exc = run_cli([a.format(**paths) for a in argv])
    assert exc is None and status == 2, err
    assert module in err and f"moe_ext[{extra}]" in err, err
    assert time.perf_counter() - start < 2
