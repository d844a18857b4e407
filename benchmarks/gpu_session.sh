#!/usr/bin/env bash
# Everything a GPU session has to do, in stages that fit one device command (~10 minutes):
#   bash benchmarks/gpu_session.sh install tests sanitize bench
# Expected on an H100 (16 cores): install ~5 s (the abi3 wheel built here by `make dist`,
# carried as dist/, loads on the machine's torch 2.11 as it is: no compile), tests ~2 min,
# sanitize ~3 min (memcheck + racecheck on a small subset covering every kernel), bench ~4
# min. `build` (~3 min) compiles against the machine's torch instead, when no wheel came.
# No package index there: the pure-Python test dependencies come from .gpu-site, made here
# by `make gpu-site` and carried along. The device call carries dist/ and .gpu-site. Everything is written under $OUT (the device tool's folder) or
# benchmarks/results/gpu-session: machine facts, build log, pytest lines, sanitizer
# summaries, benchmark CSV/markdown/plots.
set -uo pipefail
cd "$(dirname "$0")/.."
RES=${OUT:-benchmarks/results/gpu-session}
mkdir -p "$RES"
export PYTHONPATH="$PWD:$PWD/.gpu-site${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
# Op tests that a sanitizer can get through in minutes (small shapes, every kernel).
SMALL='cuda and (float64 or route or align or gate or opcheck or ties or one_expert or null or never)'

stage() { echo "== $1 $(date -u +%H:%M:%S)" | tee -a "$RES/session.log"; }

for what in "$@"; do
  case "$what" in
    install)
      stage install
      { nvidia-smi; $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)";
        git rev-parse HEAD 2>/dev/null; date -u; } > "$RES/machine.txt" 2>&1
      # the wheel's libraries into the tree: the same as an in-place build, built here
      rm -f moe_ext/_C*.so
      $PY - dist/moe_ext-*-cp310-abi3-*.whl <<'PYEOF' || exit 1
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    for name in wheel.namelist():
        if name.startswith("moe_ext/_C") and name.endswith(".so"):
            wheel.extract(name, ".")
            print("installed", name, "from", sys.argv[1])
PYEOF
      $PY -m moe_ext.cli info | tee "$RES/info.txt" ;;
    build)
      stage build
      { nvidia-smi; $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)";
        git rev-parse HEAD 2>/dev/null; date -u; } > "$RES/machine.txt" 2>&1
      # A fresh machine may hold a .so built elsewhere: rebuild against this torch.
      rm -f moe_ext/_C*.so
      if ! (time $PY setup.py -q build_ext --inplace) > "$RES/build.log" 2>&1; then
        tail -40 "$RES/build.log"; exit 1
      fi
      $PY -m moe_ext.cli info | tee "$RES/info.txt" ;;
    tests)
      stage tests
      $PY -m pytest -q -p no:cacheprovider tests/ops tests/molora 2>&1 | tee "$RES/pytest.txt" | tail -25 ;;
    sanitize)
      for tool in memcheck racecheck; do
        stage "$tool"
        "$SANITIZER" --tool "$tool" --error-exitcode 9 $PY -m pytest -q -p no:cacheprovider \
          tests/ops -k "$SMALL" > "$RES/sanitizer-$tool.txt" 2>&1
        echo "exit $?" >> "$RES/sanitizer-$tool.txt"
        grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed|^exit" "$RES/sanitizer-$tool.txt" | tail -5
      done ;;
    bench)
      stage bench
      for script in bench_route bench_align bench_lora bench_lora_dense bench_layer; do
        $PY benchmarks/$script.py --out "$RES" 2>&1 | tail -40
      done
      # the dense strategy's router logits from the shrink GEMM against their own pass
      $PY benchmarks/bench_layer.py --strategy dense --experts 8 16 --out "$RES" 2>&1 | tail -40 ;;
    *) echo "unknown stage $what (install, build, tests, sanitize, bench)"; exit 2 ;;
  esac
done
