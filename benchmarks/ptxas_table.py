"""Register use, spills and static shared memory of every kernel of a .cu file for sm_80 and
sm_90a, from `ptxas -v`, as the markdown table of docs/architecture.md.

Run: .venv/bin/python benchmarks/ptxas_table.py csrc/cuda/lora.cu [--nvcc /usr/local/cuda/bin/nvcc]

The flags are the extension's (setup.py) with -std=c++17; __half instantiations are left
out (they match bf16 within a register or two).
"""
import argparse
import re
import subprocess
import sys

FLAGS = ["-std=c++17", "-O3", "--expt-relaxed-constexpr", "-D__CUDA_NO_HALF_OPERATORS__",
         "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
         "-D__CUDA_NO_HALF2_OPERATORS__", "-Icsrc/cuda", "-gencode=arch=compute_80,code=sm_80",
         "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v", "-c", "-o", "/dev/null"]
ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\w+)'")
SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers.*?(?:(\d+) bytes smem)?,")


def short_name(mangled: str) -> str:
    """'moe_ext::cuda::(anonymous namespace)::foo_kernel<__nv_bfloat16, true>(...)' ->
    'foo_kernel<bf16, true>'."""
    name = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip()
    name = name.replace("(anonymous namespace)::", "").removeprefix("void ").split("(")[0]
    return re.sub(r"^(\w+::)+", "", name).replace("__nv_bfloat16", "bf16").replace("__half", "f16")


def kernel_rows(ptxas_log: str) -> dict:
    """{kernel: {arch: (registers, spill stores, spill loads, static smem)}}."""
    rows, current, spill = {}, None, (0, 0)
    for line in ptxas_log.splitlines():
        if m := ENTRY.search(line):
            current = (short_name(m.group(1)), m.group(2))
        elif (m := SPILL.search(line)) and current:
            spill = (int(m.group(1)), int(m.group(2)))
        elif (m := USED.search(line)) and current:
            smem = re.search(r"(\d+) bytes smem", line)
            rows.setdefault(current[0], {})[current[1]] = (
                int(m.group(1)), *spill, int(smem.group(1)) if smem else 0)
            current, spill = None, (0, 0)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("source")
    ap.add_argument("--nvcc", default="/usr/local/cuda/bin/nvcc")
    a = ap.parse_args()
    p = subprocess.run([a.nvcc, *FLAGS, a.source], capture_output=True, text=True)
    if p.returncode:
        sys.exit(p.stderr[-3000:])
    rows = kernel_rows(p.stderr + p.stdout)
    print("| kernel | sm_80 regs | sm_80 spill st/ld (B) | sm_90a regs | sm_90a spill st/ld (B) "
          "| static smem (B) |")
    print("|---|---|---|---|---|---|")
    for name in sorted(rows):
        if "f16" in name.replace("bf16", ""):
            continue
        a80, a90 = rows[name].get("sm_80"), rows[name].get("sm_90a")
        cells = [f"{r[0]} | {r[1]}/{r[2]}" if r else "- | -" for r in (a80, a90)]
        print(f"| `{name}` | {cells[0]} | {cells[1]} | {(a90 or a80)[3]} |")


if __name__ == "__main__":
    main()
