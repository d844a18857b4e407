// CPU kernels for the LoRA-expert part of MoLoRA:
//   sparse grouped strategy: lora_forward / lora_backward,
//   dense-gated strategy:    gate_dense / gate_dense_backward (the GEMMs are ATen's).
//
// Forward and the input-side backward run token-major: each token's K pairs are
// computed and combined in k order inside one task, so the output is written once and
// the sum over K is deterministic with no atomics. The weight gradients run
// expert-major over the pairs sorted by `align`, each (expert, column block) owned by
// one task, so they are deterministic too.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../checks.h"
#include "simd.h"

namespace moe_ext {
namespace cpu {
namespace {

template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Columns per weight-gradient task: an (R x kColumnBlock) tile stays in L1/L2.
constexpr int64_t kColumnBlock = 256;

// out[r] = dot(rows[r, :n], v[:n]) for r < R; rows has row stride n.
template <typename acc_t, typename a_t, typename v_t>
MOE_EXT_INLINE void matvec_rows(const a_t* rows, const v_t* v, int64_t R, int64_t n, acc_t* out) {
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) {  // four rows share each load of v
    const a_t *a0 = rows + r * n, *a1 = a0 + n, *a2 = a1 + n, *a3 = a2 + n;
    acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t i = 0; i < n; ++i) {
      const acc_t vi = static_cast<acc_t>(v[i]);
      s0 += static_cast<acc_t>(a0[i]) * vi;
      s1 += static_cast<acc_t>(a1[i]) * vi;
      s2 += static_cast<acc_t>(a2[i]) * vi;
      s3 += static_cast<acc_t>(a3[i]) * vi;
    }
    out[r] = s0; out[r + 1] = s1; out[r + 2] = s2; out[r + 3] = s3;
  }
  for (; r < R; ++r) {
    const a_t* a = rows + r * n;
    acc_t s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += static_cast<acc_t>(a[i]) * static_cast<acc_t>(v[i]);
    out[r] = s;
  }
}

// acc[:n] += sum_r c[r] * rows[r, :n]; rows has row stride `stride`.
template <typename acc_t, typename a_t>
MOE_EXT_INLINE void accumulate_rows(acc_t* acc, const acc_t* c, const a_t* rows, int64_t R, int64_t n,
                            int64_t stride) {
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) {  // four rows per pass over acc
    const a_t *a0 = rows + r * stride, *a1 = a0 + stride, *a2 = a1 + stride, *a3 = a2 + stride;
    const acc_t c0 = c[r], c1 = c[r + 1], c2 = c[r + 2], c3 = c[r + 3];
#pragma omp simd
    for (int64_t i = 0; i < n; ++i)
      acc[i] += c0 * static_cast<acc_t>(a0[i]) + c1 * static_cast<acc_t>(a1[i]) +
                c2 * static_cast<acc_t>(a2[i]) + c3 * static_cast<acc_t>(a3[i]);
  }
  for (; r < R; ++r) {
    const a_t* a = rows + r * stride;
    const acc_t cr = c[r];
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) acc[i] += cr * static_cast<acc_t>(a[i]);
  }
}

template <typename T>
struct Vec {  // 32-byte GCC vector: one AVX2 register, two SSE registers
  typedef T type __attribute__((vector_size(32)));
  static constexpr int64_t lanes = 32 / sizeof(T);
};
template <typename acc_t, typename scalar_t>
MOE_EXT_INLINE typename Vec<acc_t>::type load_vec(const scalar_t* p) {
  typename Vec<acc_t>::type v;
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    std::memcpy(&v, p, sizeof(v));
  } else {
    for (int64_t i = 0; i < Vec<acc_t>::lanes; ++i) v[i] = static_cast<acc_t>(p[i]);
  }
  return v;
}

template <typename acc_t>
MOE_EXT_INLINE acc_t hsum(typename Vec<acc_t>::type v) {
  acc_t s = 0;
  for (int64_t i = 0; i < Vec<acc_t>::lanes; ++i) s += v[i];
  return s;
}

// Two pairs at once (their vectors v0, v1 share each load of `rows`):
// out0[r] = dot(rows[r], v0), out1[r] = dot(rows[r], v1) for r < R.
template <typename acc_t, typename a_t, typename v_t>
MOE_EXT_INLINE void matvec_rows_x2(const a_t* rows, const v_t* v0, const v_t* v1, int64_t R, int64_t n,
                           acc_t* out0, acc_t* out1) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t L = Vec<acc_t>::lanes;
  const int64_t nv = n - n % L;
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) {
    const a_t *a0 = rows + r * n, *a1 = a0 + n, *a2 = a1 + n, *a3 = a2 + n;
    V s00 = {}, s01 = {}, s02 = {}, s03 = {}, s10 = {}, s11 = {}, s12 = {}, s13 = {};
    for (int64_t i = 0; i < nv; i += L) {
      const V x0 = load_vec<acc_t>(v0 + i), x1 = load_vec<acc_t>(v1 + i);
      const V b0 = load_vec<acc_t>(a0 + i), b1 = load_vec<acc_t>(a1 + i);
      const V b2 = load_vec<acc_t>(a2 + i), b3 = load_vec<acc_t>(a3 + i);
      s00 += b0 * x0; s01 += b1 * x0; s02 += b2 * x0; s03 += b3 * x0;
      s10 += b0 * x1; s11 += b1 * x1; s12 += b2 * x1; s13 += b3 * x1;
    }
    acc_t t0[4] = {hsum<acc_t>(s00), hsum<acc_t>(s01), hsum<acc_t>(s02), hsum<acc_t>(s03)};
    acc_t t1[4] = {hsum<acc_t>(s10), hsum<acc_t>(s11), hsum<acc_t>(s12), hsum<acc_t>(s13)};
    for (int64_t i = nv; i < n; ++i) {
      const acc_t x0 = static_cast<acc_t>(v0[i]), x1 = static_cast<acc_t>(v1[i]);
      const acc_t b[4] = {static_cast<acc_t>(a0[i]), static_cast<acc_t>(a1[i]),
                          static_cast<acc_t>(a2[i]), static_cast<acc_t>(a3[i])};
      for (int q = 0; q < 4; ++q) { t0[q] += b[q] * x0; t1[q] += b[q] * x1; }
    }
    for (int q = 0; q < 4; ++q) { out0[r + q] = t0[q]; out1[r + q] = t1[q]; }
  }
  if (r < R) {
    matvec_rows(rows + r * n, v0, R - r, n, out0 + r);
    matvec_rows(rows + r * n, v1, R - r, n, out1 + r);
  }
}

// Two pairs at once (they share each load of `rows`):
// acc0[:n] += sum_r c0[r] rows[r, :n]; acc1[:n] += sum_r c1[r] rows[r, :n].
template <typename acc_t, typename a_t>
MOE_EXT_INLINE void accumulate_rows_x2(acc_t* acc0, acc_t* acc1, const acc_t* c0, const acc_t* c1,
                               const a_t* rows, int64_t R, int64_t n, int64_t stride) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t L = Vec<acc_t>::lanes;
  const int64_t nv = n - n % (2 * L);
  for (int64_t i = 0; i < nv; i += 2 * L) {
    V y00 = load_vec<acc_t>(acc0 + i), y01 = load_vec<acc_t>(acc0 + i + L);
    V y10 = load_vec<acc_t>(acc1 + i), y11 = load_vec<acc_t>(acc1 + i + L);
    for (int64_t r = 0; r < R; ++r) {
      const a_t* a = rows + r * stride + i;
      const V b0 = load_vec<acc_t>(a), b1 = load_vec<acc_t>(a + L);
      y00 += c0[r] * b0; y01 += c0[r] * b1;
      y10 += c1[r] * b0; y11 += c1[r] * b1;
    }
    std::memcpy(acc0 + i, &y00, sizeof(V)); std::memcpy(acc0 + i + L, &y01, sizeof(V));
    std::memcpy(acc1 + i, &y10, sizeof(V)); std::memcpy(acc1 + i + L, &y11, sizeof(V));
  }
  if (nv < n) {
    accumulate_rows(acc0 + nv, c0, rows + nv, R, n - nv, stride);
    accumulate_rows(acc1 + nv, c1, rows + nv, R, n - nv, stride);
  }
}

template <typename scalar_t>
struct LoraArgs {
  using acc_t = acc_of<scalar_t>;
  const scalar_t* x;      // (T, D)
  const scalar_t* A;      // (E, R, D)
  const acc_t* Bt;        // (E, R, O): lora_B transposed so each rank row is contiguous
  const acc_t* w;         // (T, K)
  const int64_t* experts; // (T, K)
  int64_t T, D, O, E, R, K;
  acc_t scaling;
};

// Tokens per block in the token-major kernels: a block's pairs are grouped by expert so
// each expert's A and B rows are read once per block instead of once per pair.
constexpr int64_t kTokenBlock = 32;

// The block's LoRA pairs (expert < E) sorted by (expert, pair); returns their count.
// Each token's pairs are then summed in expert-id order, whatever the blocking, so the
// result does not depend on the thread count.
inline int64_t sorted_block_pairs(const int64_t* experts, int64_t t0, int64_t t1, int64_t K,
                                  int64_t E, std::vector<int64_t>& pairs) {
  pairs.clear();
  for (int64_t p = t0 * K; p < t1 * K; ++p)
    if (experts[p] < E) pairs.push_back(p);
  std::sort(pairs.begin(), pairs.end(), [experts](int64_t a, int64_t b) {
    return experts[a] < experts[b] || (experts[a] == experts[b] && a < b);
  });
  return static_cast<int64_t>(pairs.size());
}

// y[t] = s * sum_k w[t,k] * B_e h[t,k] with h[t,k] = A_e x[t]; null experts give h = 0.
template <typename scalar_t>
MOE_EXT_SIMD_CLONES void lora_forward_tokens(const LoraArgs<scalar_t>& a, int64_t t0, int64_t t1,
                                             scalar_t* y, acc_of<scalar_t>* h) {
  using acc_t = acc_of<scalar_t>;
  std::vector<acc_t> yblock(kTokenBlock * a.O), g(a.R), g2(a.R);
  std::vector<int64_t> pairs;
  for (int64_t b0 = t0; b0 < t1; b0 += kTokenBlock) {
    const int64_t b1 = std::min(t1, b0 + kTokenBlock);
    std::fill(h + b0 * a.K * a.R, h + b1 * a.K * a.R, acc_t(0));  // null pairs stay 0
    std::fill(yblock.begin(), yblock.end(), acc_t(0));
    sorted_block_pairs(a.experts, b0, b1, a.K, a.E, pairs);
    for (size_t i0 = 0, i1 = 0; i0 < pairs.size(); i0 = i1) {  // each run of one expert
      const int64_t e = a.experts[pairs[i0]];
      for (i1 = i0; i1 < pairs.size() && a.experts[pairs[i1]] == e; ++i1) {
      }
      const scalar_t* Ae = a.A + e * a.R * a.D;
      const acc_t* Bte = a.Bt + e * a.R * a.O;
      size_t i = i0;
      for (; i + 2 <= i1; i += 2) {  // two pairs share each load of A_e and B_e
        const int64_t p = pairs[i], q = pairs[i + 1];
        acc_t *hp = h + p * a.R, *hq = h + q * a.R;
        matvec_rows_x2(Ae, a.x + (p / a.K) * a.D, a.x + (q / a.K) * a.D, a.R, a.D, hp, hq);
        const acc_t gp = a.scaling * a.w[p], gq = a.scaling * a.w[q];
        for (int64_t r = 0; r < a.R; ++r) { g[r] = gp * hp[r]; g2[r] = gq * hq[r]; }
        accumulate_rows_x2(yblock.data() + (p / a.K - b0) * a.O,
                           yblock.data() + (q / a.K - b0) * a.O, g.data(), g2.data(), Bte, a.R,
                           a.O, a.O);
      }
      if (i < i1) {
        const int64_t p = pairs[i];
        matvec_rows(Ae, a.x + (p / a.K) * a.D, a.R, a.D, h + p * a.R);
        const acc_t gate = a.scaling * a.w[p];
        for (int64_t r = 0; r < a.R; ++r) g[r] = gate * h[p * a.R + r];
        accumulate_rows(yblock.data() + (p / a.K - b0) * a.O, g.data(), Bte, a.R, a.O, a.O);
      }
    }
    for (int64_t t = b0; t < b1; ++t) {
      const acc_t* src = yblock.data() + (t - b0) * a.O;
      scalar_t* dst = y + t * a.O;
      for (int64_t o = 0; o < a.O; ++o) dst[o] = static_cast<scalar_t>(src[o]);
    }
  }
}

// From gh = B_e^T dy[t] of pair p: dw[p] = s * <gh, h[p]> and dh[p] = s * w[p] * gh.
template <typename scalar_t>
MOE_EXT_INLINE void gate_grads(const LoraArgs<scalar_t>& a, int64_t p, const acc_of<scalar_t>* gh,
                       const acc_of<scalar_t>* h, acc_of<scalar_t>* dw, acc_of<scalar_t>* dh) {
  acc_of<scalar_t> dot = 0;
  for (int64_t r = 0; r < a.R; ++r) dot += gh[r] * h[p * a.R + r];
  dw[p] = a.scaling * dot;
  const acc_of<scalar_t> gate = a.scaling * a.w[p];
  for (int64_t r = 0; r < a.R; ++r) dh[p * a.R + r] = gate * gh[r];
}

// Per pair: gh = B_e^T dy[t]; dw = s * <gh, h>; dh = s * w * gh; dx[t] = sum_k A_e^T dh.
template <typename scalar_t>
MOE_EXT_SIMD_CLONES void lora_backward_tokens(const LoraArgs<scalar_t>& a, const scalar_t* dy,
                                              const acc_of<scalar_t>* h, int64_t t0, int64_t t1,
                                              scalar_t* dx, acc_of<scalar_t>* dw,
                                              acc_of<scalar_t>* dh) {
  using acc_t = acc_of<scalar_t>;
  std::vector<acc_t> dxblock(kTokenBlock * a.D), gh(a.R), gh2(a.R);
  std::vector<int64_t> pairs;
  for (int64_t b0 = t0; b0 < t1; b0 += kTokenBlock) {
    const int64_t b1 = std::min(t1, b0 + kTokenBlock);
    std::fill(dh + b0 * a.K * a.R, dh + b1 * a.K * a.R, acc_t(0));  // null pairs stay 0
    std::fill(dw + b0 * a.K, dw + b1 * a.K, acc_t(0));
    std::fill(dxblock.begin(), dxblock.end(), acc_t(0));
    sorted_block_pairs(a.experts, b0, b1, a.K, a.E, pairs);
    for (size_t i0 = 0, i1 = 0; i0 < pairs.size(); i0 = i1) {  // each run of one expert
      const int64_t e = a.experts[pairs[i0]];
      for (i1 = i0; i1 < pairs.size() && a.experts[pairs[i1]] == e; ++i1) {
      }
      const acc_t* Bte = a.Bt + e * a.R * a.O;
      // gh = B_e^T dy per pair (two pairs share each load of B_e); dw, dh from gh.
      size_t i = i0;
      for (; i + 2 <= i1; i += 2) {
        const int64_t p = pairs[i], q = pairs[i + 1];
        matvec_rows_x2(Bte, dy + (p / a.K) * a.O, dy + (q / a.K) * a.O, a.R, a.O, gh.data(),
                       gh2.data());
        gate_grads(a, p, gh.data(), h, dw, dh);
        gate_grads(a, q, gh2.data(), h, dw, dh);
      }
      if (i < i1) {
        matvec_rows(Bte, dy + (pairs[i] / a.K) * a.O, a.R, a.O, gh.data());
        gate_grads(a, pairs[i], gh.data(), h, dw, dh);
      }
      const scalar_t* Ae = a.A + e * a.R * a.D;
      for (i = i0; i + 2 <= i1; i += 2) {
        const int64_t p = pairs[i], q = pairs[i + 1];
        accumulate_rows_x2(dxblock.data() + (p / a.K - b0) * a.D,
                           dxblock.data() + (q / a.K - b0) * a.D, dh + p * a.R, dh + q * a.R, Ae,
                           a.R, a.D, a.D);
      }
      if (i < i1) {
        const int64_t p = pairs[i];
        accumulate_rows(dxblock.data() + (p / a.K - b0) * a.D, dh + p * a.R, Ae, a.R, a.D, a.D);
      }
    }
    for (int64_t t = b0; t < b1; ++t) {
      const acc_t* src = dxblock.data() + (t - b0) * a.D;
      scalar_t* dst = dx + t * a.D;
      for (int64_t d = 0; d < a.D; ++d) dst[d] = static_cast<scalar_t>(src[d]);
    }
  }
}

// For one expert and columns [c0, c1): tile[r, c] = sum over the expert's pairs
// order[begin:end] (sorted, so deterministic) of coef[p, r] * scale(p) * rows[token(p), c0+c].
// This is both weight gradients:
//   dA_e   = sum_p dh[p] x[t]^T            (coef = dh, rows = x)
//   dB_e^T = sum_p (s w_p h[p]) dy[t]^T    (coef = h scaled by s w_p, rows = dy)
// Register tiles of kRows x kCols accumulators run over a chunk of pairs at a time.
constexpr int64_t kRows = 4, kPairChunk = 64;


// tile[rr, c:c+2*lanes] += sum_i cbuf[i, rr] * vrow[i][c:c+2*lanes] for rr < kRows, with
// the kRows x 2 vector accumulators held in registers over the m pairs.
template <typename scalar_t>
MOE_EXT_INLINE void outer_tile(const acc_of<scalar_t>* cbuf, const scalar_t* const* vrow, int64_t m,
                       int64_t c, acc_of<scalar_t>* tile, int64_t n) {
  using acc_t = acc_of<scalar_t>;
  using V = typename Vec<acc_t>::type;
  constexpr int64_t L = Vec<acc_t>::lanes;
  V a00 = load_vec<acc_t>(tile), a01 = load_vec<acc_t>(tile + L);
  V a10 = load_vec<acc_t>(tile + n), a11 = load_vec<acc_t>(tile + n + L);
  V a20 = load_vec<acc_t>(tile + 2 * n), a21 = load_vec<acc_t>(tile + 2 * n + L);
  V a30 = load_vec<acc_t>(tile + 3 * n), a31 = load_vec<acc_t>(tile + 3 * n + L);
  for (int64_t i = 0; i < m; ++i) {
    const V v0 = load_vec<acc_t>(vrow[i] + c), v1 = load_vec<acc_t>(vrow[i] + c + L);
    const acc_t* cf = cbuf + i * kRows;
    a00 += cf[0] * v0; a01 += cf[0] * v1;
    a10 += cf[1] * v0; a11 += cf[1] * v1;
    a20 += cf[2] * v0; a21 += cf[2] * v1;
    a30 += cf[3] * v0; a31 += cf[3] * v1;
  }
  std::memcpy(tile, &a00, sizeof(V)); std::memcpy(tile + L, &a01, sizeof(V));
  std::memcpy(tile + n, &a10, sizeof(V)); std::memcpy(tile + n + L, &a11, sizeof(V));
  std::memcpy(tile + 2 * n, &a20, sizeof(V)); std::memcpy(tile + 2 * n + L, &a21, sizeof(V));
  std::memcpy(tile + 3 * n, &a30, sizeof(V)); std::memcpy(tile + 3 * n + L, &a31, sizeof(V));
}

template <typename scalar_t>
MOE_EXT_SIMD_CLONES void outer_sum_expert(const int64_t* order, int64_t begin, int64_t end,
                                          int64_t K, const acc_of<scalar_t>* coef,
                                          const acc_of<scalar_t>* pair_scale,
                                          acc_of<scalar_t> scaling, const scalar_t* rows,
                                          int64_t row_stride, int64_t R, int64_t c0, int64_t c1,
                                          acc_of<scalar_t>* tile) {
  using acc_t = acc_of<scalar_t>;
  const int64_t n = c1 - c0;
  std::fill(tile, tile + R * n, acc_t(0));
  constexpr int64_t kCols = 2 * Vec<acc_t>::lanes;
  acc_t cbuf[kPairChunk * kRows];
  const scalar_t* vrow[kPairChunk];
  for (int64_t i0 = begin; i0 < end; i0 += kPairChunk) {
    const int64_t m = std::min(kPairChunk, end - i0);
    for (int64_t i = 0; i < m; ++i) vrow[i] = rows + (order[i0 + i] / K) * row_stride + c0;
    for (int64_t r0 = 0; r0 < R; r0 += kRows) {
      const int64_t rb = std::min(kRows, R - r0);
      for (int64_t i = 0; i < m; ++i) {  // this chunk's coefficients for rows r0..r0+rb
        const int64_t p = order[i0 + i];
        const acc_t scale = pair_scale ? scaling * pair_scale[p] : acc_t(1);
        for (int64_t rr = 0; rr < kRows; ++rr)
          cbuf[i * kRows + rr] = rr < rb ? scale * coef[p * R + r0 + rr] : acc_t(0);
      }
      int64_t c = 0;
      if (rb == kRows) {
        for (; c + kCols <= n; c += kCols) outer_tile<scalar_t>(cbuf, vrow, m, c, tile + r0 * n + c, n);
      }
      for (; c < n; ++c)  // leftover columns
        for (int64_t i = 0; i < m; ++i)
          for (int64_t rr = 0; rr < rb; ++rr)
            tile[(r0 + rr) * n + c] += cbuf[i * kRows + rr] * static_cast<acc_t>(vrow[i][c]);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> lora_forward_cpu(const at::Tensor& x_in, const at::Tensor& A_in,
                                                    const at::Tensor& B_in, const at::Tensor& w_in,
                                                    const at::Tensor& experts_in, double scaling,
                                                    int64_t num_null_experts) {
  check_lora(x_in, A_in, B_in);
  check_routing(w_in, experts_in, x_in.size(0), x_in, "x");
  TORCH_CHECK_VALUE(num_null_experts >= 0, "num_null_experts must be >= 0, got ", num_null_experts);
  const at::Tensor x = x_in.contiguous(), A = A_in.contiguous(), w = w_in.contiguous(),
                   experts = experts_in.contiguous();
  const int64_t T = x.size(0), D = x.size(1), E = A.size(0), R = A.size(1), O = B_in.size(1),
                K = experts.size(1);
  const int64_t bad = first_bad_expert_id(experts.data_ptr<int64_t>(), T * K, E + num_null_experts);
  TORCH_CHECK_VALUE(bad < 0, "experts holds id ", bad < 0 ? 0 : experts.data_ptr<int64_t>()[bad],
                    " outside [0, ", E + num_null_experts, ") (E=", E,
                    " LoRA experts + num_null_experts=", num_null_experts, ")");
  const auto acc = acc_type_of(x.scalar_type());
  const at::Tensor Bt = B_in.transpose(1, 2).to(acc).contiguous();
  at::Tensor y = at::empty({T, O}, x.options());
  at::Tensor h = at::empty({T * K, R}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_forward_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    const LoraArgs<scalar_t> args{x.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
                                  Bt.data_ptr<acc_t>(), w.data_ptr<acc_t>(),
                                  experts.data_ptr<int64_t>(), T, D, O, E, R, K,
                                  static_cast<acc_t>(scaling)};
    // Tasks are whole token blocks so that a block's contents (and so every bit of the
    // result) do not depend on the thread count.
    at::parallel_for(0, (T + kTokenBlock - 1) / kTokenBlock, 1, [&](int64_t b0, int64_t b1) {
      lora_forward_tokens<scalar_t>(args, b0 * kTokenBlock, std::min(T, b1 * kTokenBlock), y.data_ptr<scalar_t>(), h.data_ptr<acc_t>());
    });
  });
  return {y, h};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& A_in,
    const at::Tensor& B_in, const at::Tensor& w_in, const at::Tensor& experts_in,
    const at::Tensor& order_in, const at::Tensor& offsets_in, const at::Tensor& h_in,
    double scaling, int64_t num_null_experts) {
  check_lora(x_in, A_in, B_in);
  check_routing(w_in, experts_in, x_in.size(0), x_in, "x");
  const int64_t T = x_in.size(0), D = x_in.size(1), E = A_in.size(0), R = A_in.size(1),
                O = B_in.size(1), K = experts_in.size(1);
  TORCH_CHECK_VALUE(grad_y_in.dim() == 2 && grad_y_in.size(0) == T && grad_y_in.size(1) == O,
                    "grad_y must have shape (", T, ", ", O, "), got ", grad_y_in.sizes());
  TORCH_CHECK_VALUE(h_in.dim() == 2 && h_in.size(0) == T * K && h_in.size(1) == R,
                    "h must have shape (", T * K, ", ", R, "), got ", h_in.sizes());
  TORCH_CHECK_VALUE(order_in.dim() == 1 && order_in.size(0) == T * K, "order must have shape (",
                    T * K, ",), got ", order_in.sizes());
  TORCH_CHECK_VALUE(offsets_in.dim() == 1 && offsets_in.size(0) == E + num_null_experts + 1,
                    "offsets must have shape (", E + num_null_experts + 1, ",), got ",
                    offsets_in.sizes());
  const auto acc = acc_type_of(x_in.scalar_type());
  const at::Tensor x = x_in.contiguous(), A = A_in.contiguous(), w = w_in.contiguous(),
                   experts = experts_in.contiguous(), order = order_in.contiguous(),
                   offsets = offsets_in.contiguous(), h = h_in.to(acc).contiguous(),
                   dy = grad_y_in.to(x.scalar_type()).contiguous();
  const at::Tensor Bt = B_in.transpose(1, 2).to(acc).contiguous();
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw = at::empty({T, K}, w.options());
  at::Tensor dh = at::empty({T * K, R}, w.options());
  at::Tensor dA = at::empty_like(A);
  at::Tensor dB = at::empty({E, O, R}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_backward_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    const LoraArgs<scalar_t> args{x.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
                                  Bt.data_ptr<acc_t>(), w.data_ptr<acc_t>(),
                                  experts.data_ptr<int64_t>(), T, D, O, E, R, K,
                                  static_cast<acc_t>(scaling)};
    at::parallel_for(0, (T + kTokenBlock - 1) / kTokenBlock, 1, [&](int64_t b0, int64_t b1) {
      lora_backward_tokens<scalar_t>(args, dy.data_ptr<scalar_t>(), h.data_ptr<acc_t>(),
                                     b0 * kTokenBlock, std::min(T, b1 * kTokenBlock),
                                     dx.data_ptr<scalar_t>(), dw.data_ptr<acc_t>(),
                                     dh.data_ptr<acc_t>());
    });
    // Weight gradients: tasks are (expert, column block) for dA, then the same for dB.
    const int64_t* ord = order.data_ptr<int64_t>();
    const int64_t* off = offsets.data_ptr<int64_t>();
    const int64_t blocks_a = (D + kColumnBlock - 1) / kColumnBlock;
    const int64_t blocks_b = (O + kColumnBlock - 1) / kColumnBlock;
    at::parallel_for(0, E * (blocks_a + blocks_b), 1, [&](int64_t i0, int64_t i1) {
      std::vector<acc_t> tile(R * kColumnBlock);
      for (int64_t i = i0; i < i1; ++i) {
        const bool is_a = i < E * blocks_a;
        const int64_t j = is_a ? i : i - E * blocks_a;
        const int64_t blocks = is_a ? blocks_a : blocks_b, width = is_a ? D : O;
        const int64_t e = j / blocks, c0 = (j % blocks) * kColumnBlock;
        const int64_t c1 = std::min(width, c0 + kColumnBlock), n = c1 - c0;
        if (is_a) {
          outer_sum_expert<scalar_t>(ord, off[e], off[e + 1], K, dh.data_ptr<acc_t>(), nullptr,
                                     acc_t(1), x.data_ptr<scalar_t>(), D, R, c0, c1, tile.data());
          scalar_t* out = dA.data_ptr<scalar_t>() + e * R * D;
          for (int64_t r = 0; r < R; ++r)
            for (int64_t c = 0; c < n; ++c) out[r * D + c0 + c] = static_cast<scalar_t>(tile[r * n + c]);
        } else {
          outer_sum_expert<scalar_t>(ord, off[e], off[e + 1], K, h.data_ptr<acc_t>(),
                                     w.data_ptr<acc_t>(), static_cast<acc_t>(scaling),
                                     dy.data_ptr<scalar_t>(), O, R, c0, c1, tile.data());
          scalar_t* out = dB.data_ptr<scalar_t>() + e * O * R;
          for (int64_t c = 0; c < n; ++c)
            for (int64_t r = 0; r < R; ++r) out[(c0 + c) * R + r] = static_cast<scalar_t>(tile[r * n + c]);
        }
      }
    });
  });
  return {dx, dw, dA, dB};
}

// gated[t, e*R:(e+1)*R] = s * w[t,k] * h_all[t, e*R:(e+1)*R] for each chosen LoRA expert
// e = experts[t,k]; zero for experts not chosen (and nothing for null experts).
at::Tensor gate_dense_cpu(const at::Tensor& h_all_in, const at::Tensor& w_in,
                          const at::Tensor& experts_in, int64_t E, int64_t num_null_experts,
                          double scaling) {
  check_dim(h_all_in, 2, "h_all");
  check_float(h_all_in, "h_all");
  check_routing(w_in, experts_in, h_all_in.size(0), h_all_in, "h_all");
  TORCH_CHECK_VALUE(E >= 1 && h_all_in.size(1) % E == 0, "h_all width ", h_all_in.size(1),
                    " must be a multiple of num_experts=", E);
  const at::Tensor h = h_all_in.contiguous(), w = w_in.contiguous(), ex = experts_in.contiguous();
  const int64_t T = h.size(0), ER = h.size(1), R = ER / E, K = ex.size(1);
  const int64_t bad = first_bad_expert_id(ex.data_ptr<int64_t>(), T * K, E + num_null_experts);
  TORCH_CHECK_VALUE(bad < 0, "experts holds id ", bad < 0 ? 0 : ex.data_ptr<int64_t>()[bad],
                    " outside [0, ", E + num_null_experts, ")");
  at::Tensor out = at::zeros_like(h);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "gate_dense_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    const scalar_t* hp = h.data_ptr<scalar_t>();
    const acc_t* wp = w.data_ptr<acc_t>();
    const int64_t* ep = ex.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        for (int64_t k = 0; k < K; ++k) {
          const int64_t e = ep[t * K + k];
          if (e >= E) continue;
          const acc_t g = static_cast<acc_t>(scaling) * wp[t * K + k];
          for (int64_t r = 0; r < R; ++r) {
            const int64_t i = t * ER + e * R + r;
            op[i] = static_cast<scalar_t>(static_cast<acc_t>(op[i]) + g * static_cast<acc_t>(hp[i]));  // sums repeated ids
          }
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gate_dense_backward_cpu(const at::Tensor& grad_in,
                                                           const at::Tensor& h_all_in,
                                                           const at::Tensor& w_in,
                                                           const at::Tensor& experts_in, int64_t E,
                                                           int64_t num_null_experts, double scaling) {
  check_dim(h_all_in, 2, "h_all");
  check_float(h_all_in, "h_all");
  check_routing(w_in, experts_in, h_all_in.size(0), h_all_in, "h_all");
  TORCH_CHECK_VALUE(grad_in.sizes() == h_all_in.sizes(), "grad_gated shape ", grad_in.sizes(),
                    " must equal h_all shape ", h_all_in.sizes());
  TORCH_CHECK_VALUE(E >= 1 && h_all_in.size(1) % E == 0, "h_all width ", h_all_in.size(1),
                    " must be a multiple of num_experts=", E);
  const at::Tensor h = h_all_in.contiguous(), w = w_in.contiguous(), ex = experts_in.contiguous(),
                   g = grad_in.to(h.scalar_type()).contiguous();
  const int64_t T = h.size(0), ER = h.size(1), R = ER / E, K = ex.size(1);
  const int64_t bad = first_bad_expert_id(ex.data_ptr<int64_t>(), T * K, E + num_null_experts);
  TORCH_CHECK_VALUE(bad < 0, "experts holds id ", bad < 0 ? 0 : ex.data_ptr<int64_t>()[bad],
                    " outside [0, ", E + num_null_experts, ")");
  at::Tensor dh = at::zeros_like(h);
  at::Tensor dw = at::empty_like(w);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "gate_dense_backward_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    const scalar_t *hp = h.data_ptr<scalar_t>(), *gp = g.data_ptr<scalar_t>();
    const acc_t* wp = w.data_ptr<acc_t>();
    const int64_t* ep = ex.data_ptr<int64_t>();
    scalar_t* dhp = dh.data_ptr<scalar_t>();
    acc_t* dwp = dw.data_ptr<acc_t>();
    const acc_t s = static_cast<acc_t>(scaling);
    at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        for (int64_t k = 0; k < K; ++k) {
          const int64_t e = ep[t * K + k];
          if (e >= E) {
            dwp[t * K + k] = 0;
            continue;
          }
          const acc_t gate = s * wp[t * K + k];
          acc_t dot = 0;
          for (int64_t r = 0; r < R; ++r) {
            const int64_t i = t * ER + e * R + r;
            const acc_t gi = static_cast<acc_t>(gp[i]);
            dot += gi * static_cast<acc_t>(hp[i]);
            dhp[i] = static_cast<scalar_t>(static_cast<acc_t>(dhp[i]) + gate * gi);
          }
          dwp[t * K + k] = s * dot;
        }
      }
    });
  });
  return {dh, dw};
}

}  // namespace
}  // namespace cpu
}  // namespace moe_ext

TORCH_LIBRARY_IMPL(moe_ext, CPU, m) {
  m.impl("lora_forward", &moe_ext::cpu::lora_forward_cpu);
  m.impl("lora_backward", &moe_ext::cpu::lora_backward_cpu);
  m.impl("gate_dense", &moe_ext::cpu::gate_dense_cpu);
  m.impl("gate_dense_backward", &moe_ext::cpu::gate_dense_backward_cpu);
}
