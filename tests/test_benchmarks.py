"""The benchmark scripts run (tiny sizes, no timing asserted: benchmarks are not tests)."""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.join(os.path.dirname(HERE), "benchmarks")


@pytest.mark.parametrize("script", ["bench_route.py", "bench_align.py", "bench_lora.py",
                                    "bench_lora_dense.py", "bench_layer.py"])
def test_benchmark_script_runs(script, tmp_path):
    cmd = [sys.executable, os.path.join(BENCH, script), "--device", "cpu", "--tokens", "64",
           "--features", "32", "--experts", "4", "16", "--reps", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = sorted(os.listdir(tmp_path))
    for ext in (".csv", ".md", ".png"):
        assert any(f.endswith(ext) for f in written), (ext, written)


def test_generate_benchmark_runs(tmp_path):
    pytest.importorskip("onnxruntime")
    cmd = [sys.executable, os.path.join(BENCH, "bench_generate.py"), "--device", "cpu",
           "--batch", "1", "2", "--hidden", "64", "--layers", "1", "--vocab", "64",
           "--prompt-length", "4", "--new-tokens", "3", "--reps", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torchvision" not in proc.stderr
    for ext in (".csv", ".md", ".png"):
        assert os.path.isfile(tmp_path / f"generate-cpu{ext}"), ext


def test_lora_performance_model_runs():
    """benchmarks/lora_model.py (a model, no timing): one total row per pass and E."""
    cmd = [sys.executable, os.path.join(BENCH, "lora_model.py"), "--tokens", "64", "--features",
           "32", "--experts", "4", "16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for E in (4, 16):
        for mode in ("fwd", "bwd"):
            assert f"| {E} | {mode} | **total** |" in proc.stdout


def test_serve_benchmark_runs(tmp_path):
    """benchmarks/bench_serve.py at tiny sizes: the server comes up, every cell completes
    without errors, the report is written."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    cmd = [sys.executable, os.path.join(BENCH, "bench_serve.py"), "--concurrency", "1", "2",
           "--requests", "3", "--max-seconds", "5", "--hidden", "64", "--layers", "1",
           "--vocab", "300", "--reps", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (tmp_path / "serve-cpu.md").read_text()
    for endpoint in ("/generate", "/score", "/feedback"):
        assert f"| server | {endpoint} | 2 | 3 | 0 |" in text, text
    assert os.path.isfile(tmp_path / "serve-cpu.csv")
