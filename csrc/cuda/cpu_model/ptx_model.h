// Host models of the tensor-core and async-copy instructions behind csrc/cuda/ptx.cuh,
// following the PTX ISA (9.7.14.5.8 "Matrix Fragments for mma.m16n8k16 with floating point
// type", 9.7.14.5.15 ldmatrix, 9.7.9.25 cp.async):
//   mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32: a warp collective;
//     lane l (group g = l / 4, t = l % 4) holds
//       A (16x16): reg r = {A[g + 8 (r % 2)][2t + 8 (r / 2) + j] : j = 0, 1}
//       B (16x8):  reg r = {B[2t + 8r + j][g] : j = 0, 1}
//       C, D (16x8 fp32): c_i = C[g + 8 (i / 2)][2t + i % 2]
//     (the lower 16 bits of a register hold the element with j = 0). The model sums the
//     16 exact products and C in double and rounds once to float; tensor cores add with
//     their own internal precision, so compare with a tolerance, not bitwise.
//   ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{,.trans}.shared.b16: a warp collective; lanes
//     8i..8i+7 give the row addresses (16 bytes each, 16-byte aligned, in shared memory) of
//     matrix i; lane l receives in reg i the elements (l / 4, 2 (l % 4) + j) of matrix i,
//     or (2 (l % 4) + j, l / 4) with .trans. Each lane reads its own row (what TSan sees).
//   cp.async.cg.shared.global 16 bytes (+ zero fill past src_bytes): the source is read
//     at issue, the destination is poisoned at issue and written only at the
//     cp.async.wait_group that covers it: without the wait, a kernel reads 0xff garbage.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>

#include "fp16.h"
#include "intrinsics.h"

namespace moe_ext {
namespace cpu_model {

inline float b16_to_float(uint16_t bits, bool bf16) {
  return bf16 ? bf16_bits_to_float(bits) : half_bits_to_float(bits);
}
inline uint16_t half_of(uint32_t reg, int j) { return static_cast<uint16_t>(reg >> (16 * j)); }

// Where the A (16 x 16) element (row, k) lives: lane and register, and j (0: low half).
inline void a_fragment_place(int row, int k, int& lane, int& reg, int& j) {
  lane = 4 * (row % 8) + (k % 8) / 2;
  reg = (row / 8) + 2 * (k / 8);
  j = k % 2;
}
// Where the B (16 x 8) element (k, col) lives.
inline void b_fragment_place(int k, int col, int& lane, int& reg, int& j) {
  lane = 4 * col + (k % 8) / 2;
  reg = k / 8;
  j = k % 2;
}

struct MmaOperands {
  uint32_t a[4], b[2];
  float c[4];
};

inline void mma_m16n8k16(bool bf16, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                         const float (&c)[4], Site site) {
  MmaOperands mine;
  std::memcpy(mine.a, a, sizeof mine.a);
  std::memcpy(mine.b, b, sizeof mine.b);
  std::memcpy(mine.c, c, sizeof mine.c);
  const int lane = lane_id();
  float out[4];
  warp_collective(WarpOp::kMma, bf16 ? 1 : 0, 0xffffffffu, lane_data(mine), site, false,
                  [&](const Collective& coll) {
                    const int g = lane / 4, t = lane % 4;
                    for (int i = 0; i < 4; ++i) {
                      const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
                      double acc = mine.c[i];
                      for (int k = 0; k < 16; ++k) {
                        int la, ra, ja, lb, rb, jb;
                        a_fragment_place(row, k, la, ra, ja);
                        b_fragment_place(k, col, lb, rb, jb);
                        const MmaOperands pa = value_of<MmaOperands>(coll.lane[la]);
                        const MmaOperands pb = value_of<MmaOperands>(coll.lane[lb]);
                        acc += static_cast<double>(b16_to_float(half_of(pa.a[ra], ja), bf16)) *
                               static_cast<double>(b16_to_float(half_of(pb.b[rb], jb), bf16));
                      }
                      out[i] = static_cast<float>(acc);
                    }
                    return 0;
                  });
  std::memcpy(d, out, sizeof out);  // d may alias c
}

struct MatrixRow {
  uint16_t e[8];
};

template <int kMatrices>
inline void ldmatrix(uint32_t (&r)[kMatrices], const void* row_addr, bool trans, Site site) {
  static_assert(kMatrices == 1 || kMatrices == 2 || kMatrices == 4, "ldmatrix .x1/.x2/.x4");
  const int lane = lane_id();
  MatrixRow mine{};
  if (lane < 8 * kMatrices) {
    const std::string what = "ldmatrix at " + site.str();
    if (reinterpret_cast<uintptr_t>(row_addr) % 16 != 0)
      thread_fault(what + ": row address not 16-byte aligned");
    if (!Executor::instance().is_shared(row_addr, 16))
      thread_fault(what + ": row address outside shared memory");
    std::memcpy(mine.e, row_addr, 16);  // this lane's row: read by this thread
  }
  const int qualifier = kMatrices * 2 + (trans ? 1 : 0);
  warp_collective(WarpOp::kLdmatrix, qualifier, 0xffffffffu, lane_data(mine), site, false,
                  [&](const Collective& c) {
                    for (int m = 0; m < kMatrices; ++m) {
                      uint32_t reg = 0;
                      for (int j = 0; j < 2; ++j) {
                        // element (row, col) of matrix m sits in lane 8m + row, slot col
                        const int row = trans ? 2 * (lane % 4) + j : lane / 4;
                        const int col = trans ? lane / 4 : 2 * (lane % 4) + j;
                        reg |= static_cast<uint32_t>(value_of<MatrixRow>(c.lane[8 * m + row]).e[col])
                               << (16 * j);
                      }
                      r[m] = reg;
                    }
                    return 0;
                  });
}

inline void cp_async_16(void* smem, const void* gmem, int src_bytes, Site site) {
  ThreadContext& ctx = this_thread;
  const std::string what = "cp.async at " + site.str();
  if (reinterpret_cast<uintptr_t>(smem) % 16 != 0 || reinterpret_cast<uintptr_t>(gmem) % 16 != 0)
    thread_fault(what + ": addresses must be 16-byte aligned");
  if (!Executor::instance().is_shared(smem, 16)) thread_fault(what + ": destination outside shared memory");
  if (src_bytes < 0 || src_bytes > 16) thread_fault(what + ": src_bytes must be in [0, 16]");
  if (ctx.copies == kMaxAsyncCopies)
    thread_fault(what + ": more than " + std::to_string(kMaxAsyncCopies) +
                 " copies in flight in one thread (a model limit; a missing wait_group?)");
  AsyncCopy& c = ctx.copy[ctx.copies++];
  c.dst = smem;
  c.group = -1;
  std::memset(c.data, 0, 16);
  if (src_bytes > 0) std::memcpy(c.data, gmem, static_cast<size_t>(src_bytes));
  std::memset(smem, 0xff, 16);  // undefined until the wait
}

inline void cp_async_commit() {
  ThreadContext& ctx = this_thread;
  for (int i = 0; i < ctx.copies; ++i)
    if (ctx.copy[i].group < 0) ctx.copy[i].group = ctx.committed_groups;
  ++ctx.committed_groups;
}

// Completes every committed group but the `pending` most recent ones.
inline void cp_async_wait(int pending) {
  ThreadContext& ctx = this_thread;
  const int complete_below = ctx.committed_groups - pending;
  int kept = 0;
  for (int i = 0; i < ctx.copies; ++i) {
    AsyncCopy& c = ctx.copy[i];
    if (c.group >= 0 && c.group < complete_below) std::memcpy(c.dst, c.data, 16);
    else ctx.copy[kept++] = c;
  }
  ctx.copies = kept;
}

}  // namespace cpu_model
}  // namespace moe_ext
