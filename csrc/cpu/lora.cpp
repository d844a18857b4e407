// CPU kernels for the sparse grouped strategy of MoLoRA: lora_forward / lora_backward.
//
// Forward and the input-side backward run over blocks of kTokenBlock tokens. A block's
// (token, k) pairs are sorted into runs of one expert, and the feature dimension is cut
// into chunks of kFeatureChunk columns, so an expert's rows for one chunk stay in L1
// while every pair of its run uses them (two pairs per pass, sharing each load). Each
// token's output row lives in the block's buffer and is written once; its K pairs are
// added in expert-id order, so the result is deterministic and, as tasks are whole
// blocks, the same for any thread count. No atomics.
//
// The weight gradients run expert-major over the pairs sorted by `align`, each
// (expert, column block) owned by one task: deterministic too.
#include <algorithm>
#include <vector>

#include "../checks.h"
#include "align.h"
#include "simd.h"
#include "vec.h"

namespace moe_ext {
namespace cpu {
namespace {

constexpr int64_t kTokenBlock = 128;   // tokens per task
constexpr int64_t kFeatureChunk = 256; // columns of expert rows kept in L1 at a time
constexpr int64_t kColumnBlock = 256;  // weight gradients: an (R x kColumnBlock) tile per task

// Expert weights as panels: (E, chunks, R, kFeatureChunk) in the accumulation dtype, the
// last chunk zero-padded. A chunk's R rows then sit 1 KiB apart (fp32) instead of D or O
// elements apart: power-of-two row strides map every row to the same L1 sets and evict
// the chunk while it is being reused.
Tensor pack_panels(const Tensor& rows /* (E, R, n) */, ScalarType acc) {
  const int64_t E = rows.size(0), R = rows.size(1), n = rows.size(2);
  const int64_t chunks = (n + kFeatureChunk - 1) / kFeatureChunk;
  Tensor padded = aten::zeros({E, R, chunks * kFeatureChunk}, acc, rows.device());
  aten::copy_(aten::narrow(padded, 2, 0, n), rows);
  return aten::contiguous(
      aten::permute(aten::view(padded, {E, R, chunks, kFeatureChunk}), {0, 2, 1, 3}));
}

// Rows of chunk c of expert e in a panel tensor of n columns.
template <typename acc_t>
MOE_EXT_INLINE const acc_t* panel(const acc_t* panels, int64_t e, int64_t c0, int64_t R,
                                  int64_t n) {
  const int64_t chunks = (n + kFeatureChunk - 1) / kFeatureChunk;
  return panels + (e * chunks + c0 / kFeatureChunk) * R * kFeatureChunk;
}

template <typename scalar_t>
struct LoraArgs {
  using acc_t = acc_of<scalar_t>;
  const scalar_t* x;      // (T, D)
  const acc_t* Ap;        // lora_A as panels over D
  const acc_t* Bp;        // lora_B^T (E, R, O) as panels over O
  const acc_t* w;         // (T, K)
  const int64_t* experts; // (T, K)
  int64_t T, D, O, E, R, K;
  acc_t scaling;
};

// The LoRA pairs (expert < E) of tokens [t0, t1), sorted by (expert, pair), and the runs
// [begin, end) of equal experts in that order.
struct BlockPairs {
  std::vector<int64_t> pairs;
  std::vector<int64_t> run_expert, run_begin;  // run_begin has one extra entry: the end

  void build(const int64_t* experts, int64_t t0, int64_t t1, int64_t K, int64_t E) {
    pairs.clear();
    run_expert.clear();
    run_begin.clear();
    for (int64_t p = t0 * K; p < t1 * K; ++p)
      if (experts[p] < E) pairs.push_back(p);
    std::sort(pairs.begin(), pairs.end(), [experts](int64_t a, int64_t b) {
      return experts[a] < experts[b] || (experts[a] == experts[b] && a < b);
    });
    for (size_t i = 0; i < pairs.size(); ++i) {
      if (i == 0 || experts[pairs[i]] != experts[pairs[i - 1]]) {
        run_expert.push_back(experts[pairs[i]]);
        run_begin.push_back(static_cast<int64_t>(i));
      }
    }
    run_begin.push_back(static_cast<int64_t>(pairs.size()));
  }
};

// out[p - pair0, :] += rows_e vecs[token(p)] for each pair p of the block, where
// panels (pack_panels) hold each expert's R rows of n columns and vecs (T, n) one row
// per token.
template <typename acc_t, typename v_t>
MOE_EXT_INLINE void block_shrink(const BlockPairs& bp, int64_t K, const acc_t* panels,
                                 const v_t* vecs, int64_t R, int64_t n, int64_t pair0, acc_t* out) {
  for (int64_t c0 = 0; c0 < n; c0 += kFeatureChunk) {
    const int64_t nc = std::min(kFeatureChunk, n - c0);
    for (size_t run = 0; run + 1 < bp.run_begin.size(); ++run) {
      const acc_t* re = panel(panels, bp.run_expert[run], c0, R, n);
      int64_t i = bp.run_begin[run];
      const int64_t end = bp.run_begin[run + 1];
      for (; i + 2 <= end; i += 2) {
        const int64_t p = bp.pairs[i], q = bp.pairs[i + 1];
        dots_x2(re, kFeatureChunk, vecs + (p / K) * n + c0, vecs + (q / K) * n + c0, R, nc,
                out + (p - pair0) * R, out + (q - pair0) * R);
      }
      if (i < end) {
        const int64_t p = bp.pairs[i];
        dots_x1(re, kFeatureChunk, vecs + (p / K) * n + c0, R, nc, out + (p - pair0) * R);
      }
    }
  }
}

// acc[token(p) - t0, :] += sum_r coef[p - pair0, r] rows_e[r, :] for each pair p of the block;
// panels hold each expert's R rows of n columns, acc is (tokens of the block, n).
template <typename acc_t>
MOE_EXT_INLINE void block_expand(const BlockPairs& bp, int64_t K, const acc_t* coef,
                                 const acc_t* panels, int64_t R, int64_t n, int64_t t0,
                                 int64_t pair0, acc_t* acc) {
  for (int64_t c0 = 0; c0 < n; c0 += kFeatureChunk) {
    const int64_t nc = std::min(kFeatureChunk, n - c0);
    for (size_t run = 0; run + 1 < bp.run_begin.size(); ++run) {
      const acc_t* re = panel(panels, bp.run_expert[run], c0, R, n);
      int64_t i = bp.run_begin[run];
      const int64_t end = bp.run_begin[run + 1];
      for (; i + 2 <= end; i += 2) {
        const int64_t p = bp.pairs[i], q = bp.pairs[i + 1];
        axpys_x2(acc + (p / K - t0) * n + c0, acc + (q / K - t0) * n + c0,
                 coef + (p - pair0) * R, coef + (q - pair0) * R, re, kFeatureChunk, R, nc);
      }
      if (i < end) {
        const int64_t p = bp.pairs[i];
        axpys_x1(acc + (p / K - t0) * n + c0, coef + (p - pair0) * R, re, kFeatureChunk, R, nc);
      }
    }
  }
}

// Per-task scratch, reused across the task's blocks (fresh large buffers per block would
// cost page faults).
template <typename acc_t>
struct BlockScratch {
  BlockPairs bp;
  std::vector<acc_t> coef, rows;  // (pairs of the block, R) and (tokens of the block, D or O)
};

// Converts the block's accumulator rows to the output dtype.
template <typename scalar_t, typename acc_t>
MOE_EXT_INLINE void store_rows(const acc_t* src, int64_t rows, int64_t n, scalar_t* dst) {
  for (int64_t i = 0; i < rows * n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

// Tokens [t0, t1) (one block): h[p] = A_e x[t] (0 for null experts) and
// y[t] = s * sum_k w[t,k] * B_e h[t,k].
template <typename scalar_t>
MOE_EXT_SIMD_CLONES void lora_forward_block(const LoraArgs<scalar_t>& a, int64_t t0, int64_t t1,
                                            scalar_t* y, acc_of<scalar_t>* h,
                                            BlockScratch<acc_of<scalar_t>>& s) {
  using acc_t = acc_of<scalar_t>;
  const int64_t nt = t1 - t0, pair0 = t0 * a.K, np = nt * a.K;
  BlockPairs& bp = s.bp;
  bp.build(a.experts, t0, t1, a.K, a.E);
  acc_t* hb = h + pair0 * a.R;
  std::fill(hb, hb + np * a.R, acc_t(0));
  block_shrink(bp, a.K, a.Ap, a.x, a.R, a.D, pair0, hb);
  std::vector<acc_t>&g = s.coef, &yblock = s.rows;
  g.resize(np * a.R);
  yblock.assign(nt * a.O, acc_t(0));
  for (int64_t p = pair0; p < pair0 + np; ++p) {
    const acc_t gate = a.scaling * a.w[p];
    for (int64_t r = 0; r < a.R; ++r) g[(p - pair0) * a.R + r] = gate * hb[(p - pair0) * a.R + r];
  }
  block_expand(bp, a.K, g.data(), a.Bp, a.R, a.O, t0, pair0, yblock.data());
  store_rows(yblock.data(), nt, a.O, y + t0 * a.O);
}

// Tokens [t0, t1): gh = B_e^T dy[t]; dw = s * <gh, h>; dh = s * w * gh;
// dx[t] = sum_k A_e^T dh[t,k]. Null-expert pairs get dw = 0, dh = 0.
template <typename scalar_t>
MOE_EXT_SIMD_CLONES void lora_backward_block(const LoraArgs<scalar_t>& a, const scalar_t* dy,
                                             const acc_of<scalar_t>* h, int64_t t0, int64_t t1,
                                             scalar_t* dx, acc_of<scalar_t>* dw,
                                             acc_of<scalar_t>* dh,
                                             BlockScratch<acc_of<scalar_t>>& s) {
  using acc_t = acc_of<scalar_t>;
  const int64_t nt = t1 - t0, pair0 = t0 * a.K, np = nt * a.K;
  BlockPairs& bp = s.bp;
  bp.build(a.experts, t0, t1, a.K, a.E);
  std::vector<acc_t>&gh = s.coef, &dxblock = s.rows;
  gh.assign(np * a.R, acc_t(0));
  dxblock.assign(nt * a.D, acc_t(0));
  block_shrink(bp, a.K, a.Bp, dy, a.R, a.O, pair0, gh.data());
  acc_t* dhb = dh + pair0 * a.R;
  for (int64_t i = 0; i < np; ++i) {
    const int64_t p = pair0 + i;
    const bool lora = a.experts[p] < a.E;
    acc_t dot = 0;
    for (int64_t r = 0; r < a.R; ++r) dot += gh[i * a.R + r] * h[p * a.R + r];
    dw[p] = lora ? a.scaling * dot : acc_t(0);
    const acc_t gate = lora ? a.scaling * a.w[p] : acc_t(0);
    for (int64_t r = 0; r < a.R; ++r) dhb[i * a.R + r] = gate * gh[i * a.R + r];
  }
  block_expand(bp, a.K, dhb, a.Ap, a.R, a.D, t0, pair0, dxblock.data());
  store_rows(dxblock.data(), nt, a.D, dx + t0 * a.D);
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
                               const scalar_t* const* prefetch_rows, int64_t prefetch_m,
                               int64_t c, acc_of<scalar_t>* tile, int64_t n) {
  using acc_t = acc_of<scalar_t>;
  using V = typename Vec<acc_t>::type;
  constexpr int64_t L = Vec<acc_t>::lanes;
  V a00 = load_vec<acc_t>(tile), a01 = load_vec<acc_t>(tile + L);
  V a10 = load_vec<acc_t>(tile + n), a11 = load_vec<acc_t>(tile + n + L);
  V a20 = load_vec<acc_t>(tile + 2 * n), a21 = load_vec<acc_t>(tile + 2 * n + L);
  V a30 = load_vec<acc_t>(tile + 3 * n), a31 = load_vec<acc_t>(tile + 3 * n + L);
  for (int64_t i = 0; i < m; ++i) {
    // The pairs' rows are scattered tokens: fetch the next chunk's while this one computes.
    if (i < prefetch_m) __builtin_prefetch(prefetch_rows[i] + c);
    const V v0 = load_vec<acc_t>(vrow[i] + c), v1 = load_vec<acc_t>(vrow[i] + c + L);
    const acc_t* cf = cbuf + i * kRows;
    a00 += cf[0] * v0; a01 += cf[0] * v1;
    a10 += cf[1] * v0; a11 += cf[1] * v1;
    a20 += cf[2] * v0; a21 += cf[2] * v1;
    a30 += cf[3] * v0; a31 += cf[3] * v1;
  }
  store_vec<acc_t>(tile, a00); store_vec<acc_t>(tile + L, a01);
  store_vec<acc_t>(tile + n, a10); store_vec<acc_t>(tile + n + L, a11);
  store_vec<acc_t>(tile + 2 * n, a20); store_vec<acc_t>(tile + 2 * n + L, a21);
  store_vec<acc_t>(tile + 3 * n, a30); store_vec<acc_t>(tile + 3 * n + L, a31);
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
  const scalar_t *vrow[kPairChunk], *next_vrow[kPairChunk];
  for (int64_t i0 = begin; i0 < end; i0 += kPairChunk) {
    const int64_t m = std::min(kPairChunk, end - i0);
    const int64_t next_m = std::max<int64_t>(0, std::min(kPairChunk, end - i0 - kPairChunk));
    for (int64_t i = 0; i < m; ++i) vrow[i] = rows + (order[i0 + i] / K) * row_stride + c0;
    for (int64_t i = 0; i < next_m; ++i)
      next_vrow[i] = rows + (order[i0 + kPairChunk + i] / K) * row_stride + c0;
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
        for (; c + kCols <= n; c += kCols)
          outer_tile<scalar_t>(cbuf, vrow, m, next_vrow, r0 == 0 ? next_m : 0, c,
                               tile + r0 * n + c, n);
      }
      for (; c < n; ++c)  // leftover columns
        for (int64_t i = 0; i < m; ++i)
          for (int64_t rr = 0; rr < rb; ++rr)
            tile[(r0 + rr) * n + c] += cbuf[i * kRows + rr] * static_cast<acc_t>(vrow[i][c]);
    }
  }
}

// lora_backward's alignment of the pairs (ops.pair_alignment): the align op over E + 1
// bins with every null expert in bin E. The ids are checked already.
std::tuple<Tensor, Tensor> pair_alignment(const Tensor& experts, int64_t E) {
  const int64_t P = experts.numel();
  const int64_t* ids = experts.const_data_ptr<int64_t>();
  std::vector<int64_t> bins(P);
  for (int64_t p = 0; p < P; ++p) bins[p] = std::min(ids[p], E);
  return align_sorted(bins.data(), P, E + 1, experts.device());
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lora_forward_cpu(
    const Tensor& x_in, const Tensor& A_in, const Tensor& B_in, const Tensor& w_in,
    const Tensor& experts_in, double scaling, int64_t num_null_experts) {
  check_lora_forward_args(x_in, A_in, B_in, w_in, experts_in, scaling, num_null_experts);
  const Tensor x = aten::contiguous(x_in), A = aten::contiguous(A_in), w = aten::contiguous(w_in),
               experts = aten::contiguous(experts_in);
  const int64_t T = x.size(0), D = x.size(1), E = A.size(0), R = A.size(1), O = B_in.size(1),
                K = experts.size(1);
  check_expert_ids(experts, E, num_null_experts);
  const ScalarType acc = acc_type_of(x.scalar_type());
  const Tensor Ap = pack_panels(A, acc), Bp = pack_panels(aten::transpose(B_in, 1, 2), acc);
  Tensor y = aten::empty({T, O}, x.scalar_type(), x.device());
  Tensor h = aten::empty({T * K, R}, acc, x.device());
  dispatch_floating(x.scalar_type(), "lora_forward_cpu", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_of<scalar_t>;
    const LoraArgs<scalar_t> args{static_cast<const scalar_t*>(x.const_data_ptr()),
                                  Ap.const_data_ptr<acc_t>(), Bp.const_data_ptr<acc_t>(),
                                  w.const_data_ptr<acc_t>(), experts.const_data_ptr<int64_t>(),
                                  T, D, O, E, R, K, static_cast<acc_t>(scaling)};
    scalar_t* yp = static_cast<scalar_t*>(y.mutable_data_ptr());
    acc_t* hp = h.mutable_data_ptr<acc_t>();
    // Tasks are whole token blocks so that a block's contents (and so every bit of the
    // result) do not depend on the thread count.
    torch::stable::parallel_for(
        0, (T + kTokenBlock - 1) / kTokenBlock, 1, [&](int64_t b0, int64_t b1) {
          BlockScratch<acc_t> scratch;
          for (int64_t b = b0; b < b1; ++b)
            lora_forward_block<scalar_t>(args, b * kTokenBlock, std::min(T, (b + 1) * kTokenBlock),
                                         yp, hp, scratch);
        });
  });
  auto [order, offsets] = pair_alignment(experts, E);
  return {y, h, order, offsets};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lora_backward_cpu(
    const Tensor& grad_y_in, const Tensor& x_in, const Tensor& A_in, const Tensor& B_in,
    const Tensor& w_in, const Tensor& experts_in, const Tensor& order_in,
    const Tensor& offsets_in, const Tensor& h_in, double scaling, int64_t num_null_experts) {
  check_lora_backward_args(grad_y_in, x_in, A_in, B_in, w_in, experts_in, order_in, offsets_in,
                           h_in, scaling, num_null_experts);
  const int64_t T = x_in.size(0), D = x_in.size(1), E = A_in.size(0), R = A_in.size(1),
                O = B_in.size(1), K = experts_in.size(1);
  const ScalarType acc = acc_type_of(x_in.scalar_type());
  const Tensor x = aten::contiguous(x_in), A = aten::contiguous(A_in), w = aten::contiguous(w_in),
               experts = aten::contiguous(experts_in), order = aten::contiguous(order_in),
               offsets = aten::contiguous(offsets_in), h = aten::contiguous(aten::to(h_in, acc)),
               dy = aten::contiguous(aten::to(grad_y_in, x.scalar_type()));
  check_pair_alignment(experts.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(),
                       offsets.const_data_ptr<int64_t>(), T * K, E, E + num_null_experts);
  const Tensor Ap = pack_panels(A, acc), Bp = pack_panels(aten::transpose(B_in, 1, 2), acc);
  Tensor dx = aten::empty_like(x);
  Tensor dw = aten::empty({T, K}, acc, x.device());
  Tensor dh = aten::empty({T * K, R}, acc, x.device());
  Tensor dA = aten::empty_like(A);
  Tensor dB = aten::empty({E, O, R}, x.scalar_type(), x.device());
  dispatch_floating(x.scalar_type(), "lora_backward_cpu", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_of<scalar_t>;
    const scalar_t* xp = static_cast<const scalar_t*>(x.const_data_ptr());
    const scalar_t* dyp = static_cast<const scalar_t*>(dy.const_data_ptr());
    const acc_t *hp = h.const_data_ptr<acc_t>(), *wp = w.const_data_ptr<acc_t>();
    acc_t *dwp = dw.mutable_data_ptr<acc_t>(), *dhp = dh.mutable_data_ptr<acc_t>();
    scalar_t* dxp = static_cast<scalar_t*>(dx.mutable_data_ptr());
    scalar_t* dAp = static_cast<scalar_t*>(dA.mutable_data_ptr());
    scalar_t* dBp = static_cast<scalar_t*>(dB.mutable_data_ptr());
    const LoraArgs<scalar_t> args{xp, Ap.const_data_ptr<acc_t>(), Bp.const_data_ptr<acc_t>(), wp,
                                  experts.const_data_ptr<int64_t>(), T, D, O, E, R, K,
                                  static_cast<acc_t>(scaling)};
    torch::stable::parallel_for(
        0, (T + kTokenBlock - 1) / kTokenBlock, 1, [&](int64_t b0, int64_t b1) {
          BlockScratch<acc_t> scratch;
          for (int64_t b = b0; b < b1; ++b)
            lora_backward_block<scalar_t>(args, dyp, hp, b * kTokenBlock,
                                          std::min(T, (b + 1) * kTokenBlock), dxp, dwp, dhp,
                                          scratch);
        });
    // Weight gradients: tasks are (expert, column block) for dA, then the same for dB.
    const int64_t* ord = order.const_data_ptr<int64_t>();
    const int64_t* off = offsets.const_data_ptr<int64_t>();
    const int64_t blocks_a = (D + kColumnBlock - 1) / kColumnBlock;
    const int64_t blocks_b = (O + kColumnBlock - 1) / kColumnBlock;
    torch::stable::parallel_for(0, E * (blocks_a + blocks_b), 1, [&](int64_t i0, int64_t i1) {
      std::vector<acc_t> tile(R * kColumnBlock);
      for (int64_t i = i0; i < i1; ++i) {
        const bool is_a = i < E * blocks_a;
        const int64_t j = is_a ? i : i - E * blocks_a;
        const int64_t blocks = is_a ? blocks_a : blocks_b, width = is_a ? D : O;
        const int64_t e = j / blocks, c0 = (j % blocks) * kColumnBlock;
        const int64_t c1 = std::min(width, c0 + kColumnBlock), n = c1 - c0;
        if (is_a) {
          outer_sum_expert<scalar_t>(ord, off[e], off[e + 1], K, dhp, nullptr, acc_t(1), xp, D, R,
                                     c0, c1, tile.data());
          scalar_t* out = dAp + e * R * D;
          for (int64_t r = 0; r < R; ++r)
            for (int64_t c = 0; c < n; ++c)
              out[r * D + c0 + c] = static_cast<scalar_t>(tile[r * n + c]);
        } else {
          outer_sum_expert<scalar_t>(ord, off[e], off[e + 1], K, hp, wp,
                                     static_cast<acc_t>(scaling), dyp, O, R, c0, c1, tile.data());
          scalar_t* out = dBp + e * O * R;
          for (int64_t c = 0; c < n; ++c)
            for (int64_t r = 0; r < R; ++r)
              out[(c0 + c) * R + r] = static_cast<scalar_t>(tile[r * n + c]);
        }
      }
    });
  });
  return {dx, dw, dA, dB};
}

}  // namespace
}  // namespace cpu
}  // namespace moe_ext

STABLE_TORCH_LIBRARY_IMPL(moe_ext, CPU, m) {
  m.impl("lora_forward", TORCH_BOX(&moe_ext::cpu::lora_forward_cpu));
  m.impl("lora_backward", TORCH_BOX(&moe_ext::cpu::lora_backward_cpu));
}
