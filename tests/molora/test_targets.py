"""The target_modules regex guard (moe_ext.molora.targets): the patterns people and PEFT
write pass and match as re.fullmatch does; patterns that backtrack without bound are
refused, with a ValueError naming target_modules, before any matching, wherever a config
comes from (a downloaded adapter config, the CLI); a fuzz of random patterns shows every
accepted one matching 100-character names quickly."""
import json
import random
import re
import time

import pytest
import torch

import moe_ext
from moe_ext import MoLoRAConfig
from moe_ext.molora.targets import check_target_regex

SAFE = [r"model\.layers\.\d+\.self_attn\.(q_proj|v_proj)", r".*\.(q|k|v)_proj",
        r".*(q_proj|v_proj)$", r"^(?!.*lm_head).*", "q_proj", r"(?:(?!x).)*", r"(?:a{2})+",
        r".*layers\.[0-9]+\.mlp\.(gate|up|down)_proj", r".*\.[0-9]+\..*"]
UNSAFE = ["(.*)*x", "(a+)+b", "(a|ab)*c", ".*.*.*.*x", r"(\w)\1", "(?:.*,)*x", "x" * 20_000]


@pytest.mark.parametrize("pattern", SAFE)
def test_usual_patterns_pass(pattern):
    check_target_regex(pattern)
    assert MoLoRAConfig(target_modules=pattern).target_modules == pattern


@pytest.mark.parametrize("pattern", UNSAFE)
def test_runaway_patterns_are_refused_naming_the_field(pattern):
    with pytest.raises(ValueError, match="target_modules"):
        MoLoRAConfig(target_modules=pattern)


def test_a_downloaded_config_with_a_runaway_regex_fails_at_once(tmp_path):
    """Issue 30: target_modules "(.*)*x" made load_molora run for hours."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    moe_ext.save_molora(moe_ext.get_molora_model(model, MoLoRAConfig(
        r=2, num_experts=2, top_k=1, target_modules=["0"])), str(tmp_path))
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    meta["moe_ext_config"]["target_modules"] = "(.*)*x"
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    start = time.perf_counter()
    with pytest.raises(ValueError, match="target_modules"):
        moe_ext.load_molora(torch.nn.Sequential(torch.nn.Linear(4, 4)), str(tmp_path))
    assert time.perf_counter() - start < 5


def test_fuzz_accepted_patterns_match_quickly():
    """Random patterns over the pieces that make regexes slow: each one the guard accepts
    full-matches 100-character module-like names within a bound (each pattern's worst
    case is at most cubic in the length)."""
    rng = random.Random(0)
    pieces = [".", ".*", ".+", "a", "b", r"\.", r"\d+", "(", ")", "|", "*", "+", "?", "{1,5}",
              "[ab]", "[^.]*", "x"]
    names = ["a." * 50, "ab" * 50, "a" * 100, "model.layers.11.self_attn.q_proj" * 3]
    accepted = refused = 0
    for _ in range(600):
        pattern = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 10))) + "z"
        try:
            re.compile(pattern)
            check_target_regex(pattern)
        except (re.error, ValueError):
            refused += 1
            continue
        accepted += 1
        start = time.perf_counter()
        for name in names:
            re.fullmatch(pattern, name)
        assert time.perf_counter() - start < 0.5, pattern
    assert accepted > 100 and refused > 100
