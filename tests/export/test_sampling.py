"""The sampling of the onnxruntime generation loop against transformers' logits warpers, the
sampler's distribution, and steering dicts (no export needed)."""
import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("transformers")

from transformers.generation.logits_process import (TemperatureLogitsWarper,  # noqa: E402
                                                    TopKLogitsWarper, TopPLogitsWarper)

from moe_ext.export.generate import sample, steering_bias, warp_logits  # noqa: E402


def hf_warp(logits: np.ndarray, temperature, top_k, top_p) -> np.ndarray:
    scores = torch.from_numpy(logits)
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.numpy()


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 1, 1.0), (1.0, 500, 1.0),
    (1.3, 0, 0.9), (1.0, 0, 0.01), (0.5, 20, 0.8), (2.0, 50, 0.5)])
def test_warp_logits_matches_transformers(temperature, top_k, top_p):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((6, 300)) * 3).astype(np.float32)
    logits[0, :10] = 1.5  # ties at the top-k boundary keep every tied token, as transformers
    got = warp_logits(logits, temperature, top_k, top_p)
    want = hf_warp(logits, temperature, top_k, top_p)
    assert np.array_equal(np.isinf(got), np.isinf(want))
    np.testing.assert_allclose(got[~np.isinf(got)], want[~np.isinf(want)], rtol=1e-6)
    assert (~np.isinf(got)).sum(-1).min() >= 1


def test_sample_follows_the_distribution_and_never_draws_filtered_tokens():
    probs = np.array([[0.1, 0.0, 0.2, 0.3, 0.4]] * 2)
    scores = np.where(probs > 0, np.log(np.maximum(probs, 1e-30)), -np.inf).astype(np.float32)
    rng = np.random.default_rng(1)
    draws = np.concatenate([sample(scores, rng) for _ in range(10000)])
    freq = np.bincount(draws, minlength=5) / draws.size
    assert freq[1] == 0
    np.testing.assert_allclose(freq, [0.1, 0.0, 0.2, 0.3, 0.4], atol=0.015)
    a = sample(scores, np.random.default_rng(7))
    assert np.array_equal(a, sample(scores, np.random.default_rng(7)))


def test_steering_bias_rows_and_errors():
    groups = ["concise", "safe"]
    assert steering_bias(groups, None) is None
    np.testing.assert_array_equal(steering_bias(groups, {"safe": 2}), [[0, 2]])
    np.testing.assert_array_equal(steering_bias(groups, [{"concise": 1}, {}]), [[1, 0], [0, 0]])
    with pytest.raises(ValueError, match="unknown expert group 'verbose'"):
        steering_bias(groups, {"verbose": 1})
    with pytest.raises(ValueError, match="no expert groups"):
        steering_bias([], {"safe": 1})
    with pytest.raises(ValueError, match="steer must be"):
        steering_bias(groups, "safe=2")
