"""The command line on real model folders end to end: train-pmol --model (Llama, Qwen2,
GPT-2; standard and conversational data; PEFT's target-module forms), generate with
steering, --resume only when asked and only on the same model and data, --init-adapter
from per-preference PEFT LoRAs."""
import json

import pytest

from moe_ext import cli

from hf_fixtures import GROUPS, hf_models, pref_files  # noqa: F401 (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
FAST = ["--steps", "2", "--batch-size", "4", "--no-progress", "--json"]


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("arch,data,targets", [
    ("llama", "conversational", ["q_proj,v_proj"]),
    ("qwen2", "standard", [r".*mlp\.(up|down)_proj"]),
    ("gpt2", "conversational", ["c_attn", "c_fc"]),
])
def test_train_pmol_on_a_model_folder_then_generate(arch, data, targets, hf_models, pref_files,
                                                    tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train-pmol", "--model", hf_models[arch], "--data", pref_files[data],
                     "--target-modules", *targets, "--max-length", "48", "--output", str(out),
                     *FAST]) == 0
    metrics = last_json(capsys)
    assert metrics["groups"] == sorted(GROUPS) and "unlabelled" in metrics["eval"]
    meta = json.load(open(out / "adapter" / "adapter_config.json"))
    assert meta["base_model_name_or_path"] == hf_models[arch]
    assert not (out / "base_model").exists()              # a named model is not copied
    args = ["generate", "--adapter", str(out / "adapter"), "--prompt", "explain apple river",
            "--max-new-tokens", "5", "--json"]
    assert cli.main(args) == 0
    greedy = last_json(capsys)["text"]
    assert cli.main(args) == 0 and last_json(capsys)["text"] == greedy
    assert cli.main(args + ["--steer", "safe=3", "verbose=-1"]) == 0
    assert last_json(capsys)["steer"] == {"safe": 3.0, "verbose": -1.0}
    assert cli.main(args + ["--do-sample", "--seed", "3", "--top-k", "20"]) == 0


def test_built_in_model_artefact_generates(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train-pmol", "--synthetic", "--synthetic-size", "8", "--output", str(out),
                     *FAST]) == 0
    capsys.readouterr()
    assert cli.main(["generate", "--adapter", str(out / "adapter"), "--prompt", "explain apple",
                     "--max-new-tokens", "3", "--steer", "concise=2"]) == 0
    assert capsys.readouterr().out.strip()


def test_cli_errors_exit_2_naming_the_option(hf_models, pref_files, tmp_path, capsys):
    base = ["train-pmol", "--model", hf_models["llama"], "--data", pref_files["standard"],
            "--output", str(tmp_path / "run"), *FAST]
    assert cli.main(base + ["--target-modules", "q_proj,nope"]) == 2
    assert "['nope'] matched no" in capsys.readouterr().err
    assert cli.main(base + ["--target-modules", "q_proj", "(bad"]) == 2
    assert "--target-modules" in capsys.readouterr().err
    assert cli.main(base + ["--max-length", "8", "--max-prompt-length", "8"]) == 2
    assert "max_prompt_length" in capsys.readouterr().err
    assert cli.main(base + ["--preference-column", "group"]) == 2
    assert "column 'group'" in capsys.readouterr().err
    assert cli.main(["train-pmol", "--model", str(tmp_path / "no-model"), "--synthetic"]) == 2
    assert "no-model" in capsys.readouterr().err
    assert cli.main(["generate", "--adapter", str(tmp_path), "--prompt", "x"]) == 2
    assert "adapter_config.json" in capsys.readouterr().err


def test_resume_only_when_asked_and_only_on_the_same_data(hf_models, pref_files, tmp_path, capsys):
    args = ["train-pmol", "--model", hf_models["gpt2"], "--target-modules", "c_attn",
            "--output", str(tmp_path / "run"), *FAST]
    std = ["--data", pref_files["standard"]]
    assert cli.main(args + std) == 0
    capsys.readouterr()
    assert cli.main(args + std) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert cli.main(args + ["--data", pref_files["conversational"], "--resume"]) == 2
    assert "trained on another data" in capsys.readouterr().err
    assert cli.main(args + std + ["--resume", "--steps", "3"]) == 0
    assert last_json(capsys)["resumed_from"] == 2


def test_init_adapter_from_per_preference_peft_loras(hf_models, pref_files, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    import transformers

    folders = []
    for i, group in enumerate(GROUPS):
        model = transformers.AutoModelForCausalLM.from_pretrained(hf_models["llama"])
        peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                   init_lora_weights=False)).save_pretrained(tmp_path / group)
        folders.append(f"{group}={tmp_path / group}")
    assert cli.main(["convert", "--from-peft-groups", *folders, "--output", str(tmp_path / "init")]) == 0
    assert cli.main(["train-pmol", "--model", hf_models["llama"], "--data", pref_files["standard"],
                     "--init-adapter", str(tmp_path / "init"), "--output", str(tmp_path / "run"),
                     *FAST]) == 0
    assert last_json(capsys)["groups"] == sorted(GROUPS)
