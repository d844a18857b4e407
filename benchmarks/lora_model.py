"""Performance model of the sparse LoRA CUDA kernels (csrc/cuda/lora.cu) on an H100: bytes,
FLOPs, expected microseconds and floor per kernel. A model, not a measurement (no GPU ran
these kernels yet); docs/architecture.md#sparse-path-on-tensor-cores holds its table.

Run: .venv/bin/python benchmarks/lora_model.py [--tokens 8192] [--features 4096] [--top-k 2]
     [--rank 16] [--experts 64 256 1024]

Machine (H100 SXM5, stated, not measured): HBM 3.35 TB/s (floors; 85% of it for the
expected times), 132 SMs at 1.755 GHz, 128 fp32 FMA lanes and 128 bytes of shared-memory
loads per clock per SM, mma.sync bf16 at 660 TFLOP/s (two thirds of the wgmma peak).
Tiles: expected counts of ceil(pairs_e / 64) under uniform random top-K routing.
"""
import argparse
import math

import torch

HBM, EFFICIENCY, SMS, CLOCK, MMA_FLOPS = 3.35e12, 0.85, 132, 1.755e9, 660e12
LAUNCH_US = 3.0        # launch + tail of one small kernel
BLOCK_US, RESIDENT = 2.0, 8  # least time of one block (staging, barriers); blocks per SM
PAIR_TILE, GRAD_CHUNK = 64, 512


def simt_rate(fma_per_load: float) -> float:
    """FLOP/s of an inner loop with `fma_per_load` warp FMAs per warp shared-memory load:
    one load wavefront per clock per SM, four warp FMAs per clock per SM."""
    return SMS * CLOCK * 32 * 2 * min(4.0, fma_per_load)


def expected_tiles(T: int, K: int, E: int, size: int, seed: int = 0) -> float:
    """Tiles (or chunks) of `size` pairs over the E experts, one random routing."""
    g = torch.Generator().manual_seed(seed)
    experts = torch.rand(T, E, generator=g).topk(K, dim=1).indices.flatten()
    counts = torch.bincount(experts, minlength=E)
    return float(((counts + size - 1) // size).clamp(min=1 if size == GRAD_CHUNK else 0).sum())


def kernel_us(nbytes: float, flops: float, rate: float, blocks: float = 1) -> float:
    """max(memory at 85% of HBM, compute at `rate`, waves of the least block time) + launch."""
    waves = math.ceil(blocks / (SMS * RESIDENT)) * BLOCK_US
    return max(nbytes / (HBM * EFFICIENCY) * 1e6, flops / rate * 1e6, waves) + LAUNCH_US


def before_us(T: int, D: int, O: int, K: int, R: int, E: int) -> tuple:
    """(forward, backward) us of the design before issue #17's sparse half: all SIMT, the
    expand into an fp32 per-pair buffer that the combine reads back, align again in backward,
    a separate pair_grads kernel, weight_grad with one block per (expert, 128 columns)."""
    P, el = T * K, 2
    pad = expected_tiles(T, K, E, PAIR_TILE) * PAIR_TILE / P
    tiles = expected_tiles(T, K, E, PAIR_TILE)

    def one_pass(n_in, n_out):
        shrink = kernel_us(P * n_in * el + E * R * n_in * el, 2 * P * R * n_in,
                           simt_rate(4 / 5) / pad, tiles)
        expand = kernel_us(P * n_out * 4 + E * R * n_out * el, 2 * P * R * n_out,
                           simt_rate(32 / 12) / pad, tiles * math.ceil(n_out / 128))
        combine = kernel_us(P * n_out * 4 + T * n_out * el, 0, 1)
        return shrink + expand + combine

    align = 2 * LAUNCH_US
    fwd = align + one_pass(D, O)
    grads = sum(kernel_us(P * n * el + E * R * n * el, 2 * P * R * n, simt_rate(8 / 9),
                          E * math.ceil(n / 128)) for n in (D, O))
    bwd = align + one_pass(O, D) + kernel_us(4 * P * R * 4, 0, 1) + grads
    return fwd, bwd


def kernels(T: int, D: int, O: int, K: int, R: int, E: int):
    """Rows (pass, kernel, bytes, flops, now_us, tc_us, floor_us) for bf16 data: now_us for
    the kernels as they are (fp16/bf16: shrinks, expands and weight_grad on tensor cores;
    the K-combine in the expand's slot launches), tc_us with every GEMM-like kernel on
    tensor cores."""
    P, el = T * K, 2
    tiles = expected_tiles(T, K, E, PAIR_TILE)
    pad = tiles * PAIR_TILE / P             # the SIMT tiles compute all 64 slots
    chunks = expected_tiles(T, K, E, GRAD_CHUNK)
    col_blocks = math.ceil(O / 128)  # expand and weight_grad blocks cover 128 columns
    shrink_flops, expand_flops = 2 * P * R * D, 2 * P * R * O
    rows = []

    def slot_bytes(n):  # the K slot launches of an expand to n columns
        return K * E * n * R * el + (2 * K - 1) * T * n * el

    def add(pas, name, nbytes, flops, simt_rate_flops, blocks=1, tc=True, tc_now=False,
            floor_bytes=None):
        simt = kernel_us(nbytes, flops, simt_rate_flops, blocks)
        tc_us = kernel_us(nbytes, flops, MMA_FLOPS, blocks) if tc else simt
        floor = (floor_bytes if floor_bytes is not None else nbytes) / HBM * 1e6
        rows.append((pas, name, nbytes, flops, tc_us if tc_now else simt, tc_us, floor))

    # Forward. shrink: each pair gathers its token's row (K reads of x), A once, h (P, R) fp32.
    add("fwd", "align + tile_map", 3 * P * 8, 0, 1, tc=False)
    add("fwd", "grouped_shrink", P * D * el + E * R * D * el + P * R * 4, shrink_flops,
        simt_rate(4 / 5) / pad, tiles, tc_now=True,
        floor_bytes=T * D * el + E * R * D * el + P * R * 4)
    # expand: one launch per slot over every tile (B read K times, the other slots' rows
    # masked); slot 0 writes y, slot k > 0 reads and writes it back: (2K - 1) T O, no planes.
    add("fwd", "grouped_expand (K slot launches)", slot_bytes(O), K * expand_flops,
        simt_rate(32 / 12) / pad, K * tiles * col_blocks, tc_now=True,
        floor_bytes=T * O * el + E * O * R * el)
    add("fwd", "(pass floor: x, y, A, B once)", 0, 0, 1, tc=False,
        floor_bytes=T * (D + O) * el + E * R * (D + O) * el)
    # Backward: the shrink of dy with dh, dw fused; the expand of dh into dx; weight grads.
    add("bwd", "grouped_shrink + pair grads", P * O * el + E * O * R * el + 3 * P * R * 4,
        expand_flops, simt_rate(4 / 5) / pad,
        blocks=tiles, tc_now=True, floor_bytes=T * O * el + E * O * R * el + 3 * P * R * 4)
    add("bwd", "grouped_expand (dx, K slot launches)", slot_bytes(D), K * shrink_flops,
        simt_rate(32 / 12) / pad, K * tiles * math.ceil(D / 128), tc_now=True,
        floor_bytes=T * D * el + E * R * D * el)
    for name, n in (("weight_grad dA", D), ("weight_grad dB", O)):
        # gathered rows once per rank chunk of 16, coef rows per column block (L2), G_e out.
        # fp16/bf16 run weight_grad_tc (mma over the pairs): now = the tensor-core estimate.
        spill = max(0.0, chunks - E) * R * n * 4 * 2
        add("bwd", name, P * n * el * math.ceil(R / 16) + E * R * n * el + spill,
            2 * P * R * n, simt_rate(8 / 9), chunks * math.ceil(n / 128), tc_now=True,
            floor_bytes=T * n * el + E * R * n * el)
    add("bwd", "(pass floor: x, dy, dx, A, B, dA, dB once)", 0, 0, 1, tc=False,
        floor_bytes=T * (2 * D + O) * el + 2 * E * R * (D + O) * el)
    return rows


def hot_expert_weight_grad_us(T: int, n: int, R: int, chunked: bool,
                              tensor_cores: bool = False) -> float:
    """One weight gradient (dA or dB) when one expert holds T pairs (every token's first
    choice): one block per 128 columns walking all T pairs (before), or one per (chunk of
    512 pairs, 128 columns) plus the chunk reduction (now). SIMT or mma rate per busy SM,
    at least the time to read the T gathered bf16 rows once."""
    blocks = math.ceil(n / 128) * (math.ceil(T / GRAD_CHUNK) if chunked else 1)
    busy = min(SMS, blocks)
    rate = MMA_FLOPS if tensor_cores else simt_rate(8 / 9)
    compute = 2 * T * R * n / (rate * busy / SMS) * 1e6
    reads = T * n * 2 / (HBM * EFFICIENCY) * 1e6
    spill = 2 * math.ceil(T / GRAD_CHUNK) * R * n * 4 if chunked else 0
    return (max(compute, reads) + spill / (HBM * EFFICIENCY) * 1e6
            + LAUNCH_US * (2 if chunked else 1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--features", type=int, default=4096)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--experts", type=int, nargs="+", default=[64, 256, 1024])
    a = ap.parse_args()
    T, D, K, R = a.tokens, a.features, a.top_k, a.rank
    print(f"T={T} D=O={D} K={K} R={R}, bf16; MB = 1e6 bytes, GFLOP = 1e9 FLOP\n")
    print("| E | pass | kernel | MB | GFLOP | now us | all tensor-core us | floor us |")
    print("|---|---|---|---|---|---|---|---|")
    for E in a.experts:
        rows = kernels(T, D, D, K, R, E)
        for pas, name, nbytes, flops, simt, tc, floor in rows:
            if name.startswith("("):
                continue
            print(f"| {E} | {pas} | {name} | {nbytes / 1e6:.0f} | {flops / 1e9:.2f} | "
                  f"{simt:.0f} | {tc:.0f} | {floor:.0f} |")
        for pas in ("fwd", "bwd"):
            mine = [r for r in rows if r[0] == pas and not r[1].startswith("(")]
            floor = [r[6] for r in rows if r[0] == pas and r[1].startswith("(")][0]
            print(f"| {E} | {pas} | **total** | {sum(r[2] for r in mine) / 1e6:.0f} | "
                  f"{sum(r[3] for r in mine) / 1e9:.2f} | {sum(r[4] for r in mine):.0f} | "
                  f"{sum(r[5] for r in mine):.0f} | {floor:.0f} |")
    print("\nBefore (all SIMT, fp32 per-pair buffer, align twice), same model: " + ", ".join(
        f"E={E} fwd {f:.0f} us, bwd {b:.0f} us"
        for E, (f, b) in ((E, before_us(T, D, D, K, R, E)) for E in a.experts)) + ".")
    print(f"One hot expert (T pairs), one weight gradient: SIMT (fp32) "
          f"{hot_expert_weight_grad_us(T, D, R, False):.0f} us with one block per column block, "
          f"{hot_expert_weight_grad_us(T, D, R, True):.0f} us over chunks of {GRAD_CHUNK} pairs; "
          f"tensor cores (fp16/bf16) {hot_expert_weight_grad_us(T, D, R, True, True):.0f} us "
          f"over chunks of {GRAD_CHUNK} pairs.")


if __name__ == "__main__":
    main()
