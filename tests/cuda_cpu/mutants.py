"""Self-test of `make test-cuda-cpu`: the CPU execution model must catch real kernel bugs.

Each mutant is a copy of one CUDA source with one deliberate bug (a removed barrier, an
off-by-one bound); it is compiled like the original, linked with the other objects of its
sanitizer build, and run on the cases that reach the bug. The run must fail, with the
named detector's report. A kernel that never returns must end in the model's watchdog.
A snippet that is no longer in the source fails the self-test (keep the mutants in step).

Run by the Makefile (tests/cuda_cpu/cuda_cpu.mk), which passes the compiler and flags.
"""
import argparse
import concurrent.futures
import glob
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Mutant:
    name: str
    source: str      # path from the repository root
    find: str        # must occur exactly once
    replace: str
    build: str       # "asan" (ASan + UBSan) or "tsan"
    cases: list      # --filter arguments of the test binary
    expect: list     # the run's output must contain one of these


MUTANTS = [
    Mutant("grouped_shrink: barrier after staging x and W removed", "csrc/cuda/lora.cu",
           "? to_acc(We[(r0 + rr) * ws_r + (c0 + cc) * ws_c]) : acc_t(0);\n      }\n"
           "      __syncthreads();\n",
           "? to_acc(We[(r0 + rr) * ws_r + (c0 + cc) * ws_c]) : acc_t(0);\n      }\n",
           "tsan", ["lora/float64 chain T37"], ["ThreadSanitizer: data race"]),
    Mutant("align scatter: __syncwarp before the leader advances hist removed", "csrc/cuda/align.cu",
           "    __syncwarp();  // every peer has read hist[b][c] before the leader advances it\n", "",
           "tsan", ["align/parity T333"], ["ThreadSanitizer: data race"]),
    Mutant("route: __syncwarp before the lanes renormalise lane 0's weights removed",
           "csrc/cuda/route.cu",
           "  if (normalize) {\n    __syncwarp();\n", "  if (normalize) {\n",
           "tsan", ["route/parity T33 M8 K8 norm tau0.5 bias"], ["ThreadSanitizer: data race"]),
    Mutant("grouped_expand: a later slot overwrites the rows instead of adding to them",
           "csrc/cuda/lora.cu",
           "o = from_acc<scalar_t>(slot == 0 ? v : to_acc(o) + v);", "o = from_acc<scalar_t>(v);",
           "asan", ["lora/float64 chain T37"], ["want"]),
    Mutant("grouped_expand: the tile's pairs of every slot write in each slot's launch",
           "csrc/cuda/lora.cu",
           "  if (p % K != slot) p = -1;", "",
           "asan", ["lora/bf16 tensor cores"], ["want"]),
    Mutant("grouped_shrink_tc: wait for the stage's cp.async copies removed", "csrc/cuda/lora.cu",
           "        cp_async_wait<1>();\n", "",
           "asan", ["lora/bf16 tensor cores"], ["want"]),
    Mutant("weight_grad: off-by-one bound on the staged pairs", "csrc/cuda/lora.cu",
           "for (int i = 0; i < m; ++i) {", "for (int i = 0; i <= m; ++i) {",
           "asan", ["lora/all tokens on one expert"], ["out of bounds"]),
    Mutant("weight_grad_tc: wait for the stage's cp.async rows removed", "csrc/cuda/lora.cu",
           "      if (aligned) cp_async_wait<0>();  "
           "// this thread's copies of stage s have landed\n", "",
           "asan", ["lora/weight_grad bf16 cp.async rows"], ["want"]),
    Mutant("weight_grad_tc: barrier before the next stage overwrites the buffers removed",
           "csrc/cuda/lora.cu",
           "      __syncthreads();  "
           "// stage s is consumed before stage s + 2 overwrites its buffers\n", "",
           "tsan", ["lora/weight_grad bf16 misaligned rows"], ["ThreadSanitizer: data race"]),
    Mutant("lora_dense fused forward: barrier after a shrink stage's copies removed",
           "csrc/cuda/lora_dense.cu",
           "    __syncthreads();  // every thread's copies of this stage have landed\n", "",
           "tsan", ["lora_dense/fused bf16 T70"], ["ThreadSanitizer: data race"]),
    Mutant("lora_dense expand: barrier before the gate epilogue reads the block's gates removed",
           "csrc/cuda/lora_dense.cu",
           "    __syncthreads();  // gate_s is complete (with the shrink, its pipeline's barriers "
           "order it)\n", "",
           "tsan", ["lora_dense/fused bf16 T70"], ["ThreadSanitizer: data race"]),
]


class MutantError(Exception):
    """The mutant could not be built (a stale snippet, a compile or link error)."""


def sh(cmd, env=None):
    """Runs cmd (a list); returns (exit status, stdout + stderr)."""
    p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True)
    return p.returncode, p.stdout


def build_mutant(m, i, args):
    """Compiles the mutated copy and links it with the rest of its build; returns the binary."""
    with open(os.path.join(ROOT, m.source)) as f:
        text = f.read()
    if text.count(m.find) != 1:
        raise MutantError(f"its snippet occurs {text.count(m.find)} times in {m.source} (expected "
                          "once): update MUTANTS in tests/cuda_cpu/mutants.py")
    folder = os.path.join(args.build, "mutants", str(i))
    os.makedirs(folder, exist_ok=True)
    src = os.path.join(folder, os.path.basename(m.source))
    with open(src, "w") as f:  # beside the original's headers through -I csrc/cuda
        f.write(text.replace(m.find, m.replace))
    san = args.asan if m.build == "asan" else args.tsan
    obj = src + ".o"
    rc, out = sh([*shlex.split(args.cxx), *shlex.split(args.cxxflags), *shlex.split(san),
                  "-I", os.path.dirname(m.source), "-x", "c++", "-c", src, "-o", obj])
    if rc:
        raise MutantError(f"does not compile:\n{out}")
    original = os.path.join(args.build, m.build, m.source + ".o")
    objs = [o for o in glob.glob(os.path.join(args.build, m.build, "**", "*.o"), recursive=True)
            if os.path.abspath(o) != os.path.abspath(original)]
    binary = os.path.join(folder, "cuda_cpu_tests")
    rc, out = sh([*shlex.split(args.cxx), *shlex.split(san), *objs, obj, *shlex.split(args.ldflags),
                  "-o", binary])
    if rc:
        raise MutantError(f"does not link:\n{out}")
    return binary


def run_mutant(i, m, args):
    """(mutant, caught?, what caught it or why it failed, seconds, output)."""
    start = time.time()
    try:
        binary = build_mutant(m, i, args)
    except MutantError as e:
        return m, False, f"self-test broken: {str(e).splitlines()[0]}", time.time() - start, str(e)
    cmd = [binary]
    for c in m.cases:
        cmd += ["--filter", c]
    env = dict(os.environ, MOE_CPU_MODEL_TIMEOUT_S="60", TSAN_OPTIONS="halt_on_error=1",
               ASAN_OPTIONS="detect_leaks=0")
    rc, out = sh(cmd, env)
    caught = next((e for e in m.expect if e in out), None) if rc != 0 else None
    why = f"caught by {m.build.upper()}: {caught}" if caught else "NOT CAUGHT"
    return m, caught is not None, why, time.time() - start, out


def watchdog_check(args):
    """A kernel that waits for another block (which the model never runs alongside) must
    end the process through the watchdog, not hang."""
    start = time.time()
    env = dict(os.environ, MOE_CPU_MODEL_TIMEOUT_S="2", ASAN_OPTIONS="detect_leaks=0")
    rc, out = sh([os.path.join(args.build, "asan", "cuda_cpu_tests"), "--case",
                  "model/watchdog (must fail)"], env)
    return rc == 124 and "watchdog" in out, time.time() - start, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for opt in ("--build", "--cxx", "--cxxflags", "--ldflags", "--asan", "--tsan"):
        ap.add_argument(opt, required=True)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    failed = 0
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = pool.map(lambda im: run_mutant(*im, args), enumerate(MUTANTS))
        for m, ok, why, secs, out in results:
            print(f"  {'ok  ' if ok else 'FAIL'} {m.name} ({why}, {secs:.0f} s)")
            if not ok:
                failed += 1
                print(out[-3000:])
    ok, secs, out = watchdog_check(args)
    print(f"  {'ok  ' if ok else 'FAIL'} a kernel waiting for another block ends in the watchdog "
          f"({secs:.0f} s)")
    if not ok:
        failed += 1
        print(out[-2000:])
    print(f"{len(MUTANTS) + 1} self-test checks: {len(MUTANTS) + 1 - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
