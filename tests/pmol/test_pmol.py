"""PMoL: DPO loss, training, checkpoint resume, DDP, evaluation, steering, data, CLI."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

import moe_ext  # noqa: E402
from moe_ext import cli, pmol  # noqa: E402
from moe_ext.training import TrainConfig  # noqa: E402

GROUPS = list(pmol.SYNTHETIC_PREFERENCES)
HERE = os.path.dirname(__file__)


def small_model(seed=0):
    tok = pmol.synthetic_tokenizer()
    cfg = pmol.pmol_config(GROUPS, experts_per_group=2, num_null_experts=1, r=4, lora_alpha=8,
                           top_k=2, target_modules="all-linear", group_loss_coef=0.5)
    return moe_ext.get_molora_model(pmol.build_tiny_causal_lm(len(tok), seed=seed), cfg), tok


def test_dpo_loss_matches_formula():
    pc, pr, rc, rr = torch.randn(4, 5).unbind(0)
    loss, margins = pmol.dpo_loss(pc, pr, rc, rr, beta=0.3, label_smoothing=0.1)
    z = 0.3 * ((pc - rc) - (pr - rr))
    want = (-0.9 * F.logsigmoid(z) - 0.1 * F.logsigmoid(-z)).mean()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(margins, z)


def test_sequence_logps_counts_only_response_tokens():
    logits = torch.randn(1, 4, 6)
    ids = torch.tensor([[1, 2, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1]])
    lp = torch.log_softmax(logits, -1)
    want = lp[0, 1, 3] + lp[0, 2, 4]
    torch.testing.assert_close(pmol.sequence_logps(logits, ids, mask)[0], want)


def test_training_learns_preferences_and_routes_by_group():
    model, tok = small_model()
    train = pmol.synthetic_preference_data(200, seed=0)
    test = pmol.synthetic_preference_data(40, seed=1)
    before = pmol.evaluate_pmol(model, test, tok, beta=0.5)
    pmol.train_pmol(model, train, tok, TrainConfig(steps=80, lr=3e-3, progress=False),
                    pmol.DPOConfig(beta=0.5), batch_size=16)
    after = pmol.evaluate_pmol(model, test, tok, beta=0.5)
    assert after["all"]["dpo_accuracy"] >= 0.9 > before["all"]["dpo_accuracy"]
    assert after["all"]["routing_accuracy"] >= 0.8


def test_checkpoint_resume_gives_identical_parameters(tmp_path):
    examples = pmol.synthetic_preference_data(30)

    def run(steps, ckpt):
        model, tok = small_model()
        pmol.train_pmol(model, examples, tok, TrainConfig(steps=steps, checkpoint_dir=str(ckpt),
                                                          checkpoint_every=2, progress=False),
                        batch_size=4)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    straight = run(6, tmp_path / "a")
    run(3, tmp_path / "b")            # stops after step 3 (a checkpoint at 2 and a final one at 3)
    resumed = run(6, tmp_path / "b")  # a fresh model picks up at step 3
    assert json.load(open(tmp_path / "b" / "trainer_state.json"))["step"] == 6
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert [f for f in os.listdir(tmp_path / "b") if f.startswith(".tmp")] == []


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_processes_agree(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           os.path.join(HERE, "ddp_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert all(r["world"] == 2 and r["steps"] == 3 for r in ranks)
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=1e-12)


def test_steering_moves_routing_to_the_group():
    model, tok = small_model()
    batch = pmol.collate_dpo(pmol.synthetic_preference_data(5), tok, GROUPS)
    moe_ext.set_group_bias(model, {"safe": 20.0})
    model(input_ids=batch["input_ids"])
    safe = set(model.molora_config.expert_groups["safe"])
    for r in moe_ext.last_routing(model).values():
        assert set(r.experts[:, 0].tolist()) <= safe
    moe_ext.set_group_bias(model, None)


def test_jsonl_round_trip_and_errors(tmp_path):
    examples = pmol.synthetic_preference_data(3)
    path = tmp_path / "prefs.jsonl"
    pmol.save_preference_jsonl(examples, str(path))
    assert pmol.load_preference_jsonl(str(path)) == examples
    with pytest.raises(FileNotFoundError):
        pmol.load_preference_jsonl(str(tmp_path / "nope.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: missing"):
        pmol.load_preference_jsonl(str(tmp_path / "bad.jsonl"))
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        pmol.load_preference_jsonl(str(tmp_path / "broken.jsonl"))


def test_cli_train_pmol_json_and_reload(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train-pmol", "--synthetic", "--synthetic-size", "20", "--steps", "4",
                     "--output", str(out), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(metrics["groups"]) == set(GROUPS) and "all" in metrics["eval"]
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(str(out / "base_model"))
    model = moe_ext.load_molora(base, str(out / "adapter"))
    assert len(moe_ext.molora_layers(model)) > 0


def test_cli_train_pmol_bad_data_path(tmp_path, capsys):
    assert cli.main(["train-pmol", "--data", str(tmp_path / "missing.jsonl"),
                     "--output", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err


def test_pmol_job_artefact_round_trip(tmp_path):
    """run_pmol_job saves base model, adapter, tokenizer and metrics; load_pmol gives back a
    model with the same logits and the same tokenizer."""
    job = pmol.PMoLJob(synthetic_size=10, steps=3, batch_size=4, progress=False)
    run = pmol.run_pmol_job(job, str(tmp_path / "run"))
    loaded = pmol.load_pmol(str(tmp_path / "run"))
    assert loaded.tokenizer.vocab == run.tokenizer.vocab
    assert loaded.metrics["eval"] == run.metrics["eval"]
    ids = torch.tensor([run.tokenizer.encode("explain apple river cloud")])
    run.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, run.model(input_ids=ids).logits)
    with moe_ext.disable_adapters(loaded.model), torch.no_grad():  # the saved base is the base
        base = pmol.build_tiny_causal_lm(len(run.tokenizer), seed=job.seed)
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, base(input_ids=ids).logits)
