"""experiments/pmol_mixing.py end to end at tiny sizes: on the built-in tiny Llama and on a
local Hugging Face model folder (a BPE tokenizer with a chat template), writing the md, the
json and the plot; --replot rewrites them from the json alone."""
import os
import sys

import pytest

from hf_fixtures import hf_models, transformers  # noqa: F401 (fixtures)

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                           "experiments")
TINY = ["--seeds", "0", "--sft-steps", "1", "--steps", "2", "--train-size", "8", "--eval-size", "1",
        "--prompts", "2", "--points", "2", "--max-new-tokens", "3", "--threads", "2", "--strengths", "1", "2"]


@pytest.mark.parametrize("source", ["llama"])  # the built-in base: the committed run
def test_mixing_experiment_runs(source, hf_models, tmp_path):  # noqa: F811
    sys.path.insert(0, EXPERIMENTS)
    try:
        import pmol_mixing
    finally:
        sys.path.remove(EXPERIMENTS)
    model = [] if source == "built-in" else ["--model", hf_models[source]]
    pmol_mixing.main(TINY + model + ["--out", str(tmp_path)])
    md = (tmp_path / "pmol_mixing.md").read_text()
    for method in ["PMoL", "PMoL, no null expert", "MixLoRA-style, no group loss", "single LoRA",
                   "Rewarded Soups", "SFT base (no adapter)", "PMoL, steerable (λ-trained)",
                   "PMoL, steerable (λ-trained), relabelled"]:
        assert f"| {method} |" in md
    assert "monotone seeds" in md and "Dirichlet(0.25)" in md
    assert "### safe vs helpful" in md and (tmp_path / "pmol_mixing.json").stat().st_size > 0
    os.remove(tmp_path / "pmol_mixing.md")
    pmol_mixing.main(["--replot", "--out", str(tmp_path)])
    assert (tmp_path / "pmol_mixing.md").read_text() == md
    pytest.importorskip("matplotlib")
    assert (tmp_path / "pmol_mixing_fronts.png").stat().st_size > 0
