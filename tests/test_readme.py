"""The README and docs cannot rot: every `moe-ext` command line in them parses with the
real CLI, every Python block compiles and the moe_ext names it uses exist, and the demo
(the quick start's `make demo`) runs in its quick form."""
import json
import os
import re
import shlex
import textwrap

import pytest

from moe_ext import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + [os.path.join("docs", f) for f in sorted(os.listdir(os.path.join(ROOT, "docs")))]


def blocks(lang):
    for doc in DOCS:
        text = open(os.path.join(ROOT, doc)).read()
        for block in re.findall(rf"```{lang}\n(.*?)```", text, re.S):
            yield doc, textwrap.dedent(block)


def cli_lines():
    for doc, block in blocks("bash"):
        for line in block.splitlines():
            line = line.split("#")[0].strip()
            m = re.search(r"(?:\.venv/bin/moe-ext|-m moe_ext\.cli)\s+(.*)", line)
            if m:
                yield doc, shlex.split(m.group(1))


@pytest.mark.parametrize("doc,argv", list(cli_lines()), ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_documented_commands_parse(doc, argv):
    try:
        args = cli.make_parser().parse_args(argv)
    except SystemExit as err:
        pytest.fail(f"{doc}: `moe-ext {' '.join(argv)}` does not parse ({err})")
    assert callable(args.func)


def test_documented_python_compiles_and_names_exist():
    import moe_ext.export
    from moe_ext import functional, pmol, reward, training
    from moe_ext.molora import losses
    from moe_ext.reward import embed

    modules = {"moe_ext": moe_ext, "functional": functional, "pmol": pmol, "reward": reward,
               "losses": losses, "embed": embed, "training": training}
    for doc, block in blocks("python"):
        compile(block, doc, "exec")
        code = re.sub(r"\"[^\"\n]*\"|'[^'\n]*'|#.*", "", block)  # names in strings or comments
        for mod, name in re.findall(r"\b(moe_ext|functional|pmol|reward|losses|embed)\.(\w+)", code):
            assert hasattr(modules[mod], name), f"{doc}: {mod}.{name} does not exist"
        for mod, names in re.findall(r"from (moe_ext[\w.]*) import ([\w, ]+)", block):
            module = __import__(mod, fromlist=["x"])
            for name in names.replace(" ", "").split(","):
                assert hasattr(module, name), f"{doc}: {mod}.{name} does not exist"


def test_make_targets_in_readme_exist():
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    for included in re.findall(r"^include (\S+)", makefile, re.M):  # e.g. tests/cuda_cpu/cuda_cpu.mk
        makefile += open(os.path.join(ROOT, included)).read()
    for target in re.findall(r"make (\w[\w-]*)", open(os.path.join(ROOT, "README.md")).read()):
        assert re.search(rf"^{target}:", makefile, re.M), f"README names `make {target}`"


def test_quick_demo_end_to_end(tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--output", str(tmp_path), "--json"]) == 0
    captured = capsys.readouterr()
    assert "torchvision" not in captured.err and "last_routing" not in captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["reward"]["router_purity"] > 0.9
    assert summary["reward"]["personalization_gain"] > 0.10
    assert summary["pmol"]["all"]["dpo_accuracy"] > 0.7
    for model in summary["onnx"].values():
        assert model["max_rel_err"] <= 1e-4
    assert summary["onnx"]["pmol_lm"]["generation"]["identical"]
    for name in ["report.md", "summary.json", "reward_model.onnx", "pmol_lm.onnx",
                 "reward_routing_heatmap.png", "reward_user_shifts.png", "pmol_training_curves.png"]:
        assert (tmp_path / name).exists(), name
