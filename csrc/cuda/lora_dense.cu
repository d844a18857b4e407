// CUDA kernels of the dense-gated strategy (lora_dense_forward / lora_dense_backward):
//
//   h_all = x A_all^T (T, E*R),  gated = gate(h_all),  y = s * gated B_all^T (T, O)
//
// with gate(t, e) = the sum of token t's routing weights on expert e, in k order (the SIMT
// gate kernels of the generic path fold s into the gate; that path runs in fp32 / fp64).
//
// Fused forward (bf16 / fp16, E*R <= 256, R, D, O multiples of 8): one block of kThreads
// per kBM tokens does both GEMMs on tensor cores (mma.sync m16n8k16 -> fp32, ldmatrix,
// cp.async double buffering, rows padded by 16 bytes so ldmatrix is free of bank
// conflicts), applies the gate to the fp32 accumulators in registers, keeps gated h in
// shared memory and writes y once. See docs/architecture.md, "Dense-gated path on tensor
// cores", for its performance model.
//
// Fused backward (same cases): kernel 1 per 64 tokens d_gated = dy B_all -> dw, dh -> dx =
// dh A_all; kernel 2 [dA_all | dB_all^T] = [dh^T x | gated^T dy] over a fixed number of
// token splits, then a reduction in split order.
//
// Generic path (every other dtype and shape): lora_dense_cuda.cpp makes the GEMMs with
// cuBLAS and these SIMT kernels apply the gate and give its gradients.
// Every result is written by one thread, summed in a fixed order: bitwise repeatable.
#include "common.cuh"
#include "ptx.cuh"

namespace moe_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// s * (sum of the weights of the slots of token t that chose expert e), in k order.
template <typename acc_t>
__device__ __forceinline__ acc_t gate_of(const acc_t* w, const int64_t* experts, int64_t t,
                                         int64_t e, int64_t K, acc_t scaling) {
  acc_t g = 0;
  for (int64_t k = 0; k < K; ++k)
    if (experts[t * K + k] == e) g += w[t * K + k];
  return scaling * g;
}

// out = gate(t, e) * in, element-wise over (T, E*R).
template <typename scalar_t>
__global__ void gate_scale_kernel(const scalar_t* __restrict__ in,
                                  const acc_of<scalar_t>* __restrict__ w,
                                  const int64_t* __restrict__ experts, int64_t T, int64_t E,
                                  int64_t R, int64_t K, acc_of<scalar_t> scaling,
                                  scalar_t* __restrict__ out) {
  const int64_t width = E * R;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < T * width;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = idx / width, e = (idx % width) / R;
    out[idx] = from_acc<scalar_t>(gate_of(w, experts, t, e, K, scaling) * to_acc(in[idx]));
  }
}

// grad_w[t, k] = s * <d_gated[t, e*R : (e+1)*R], h_all[t, e*R : (e+1)*R]> (0 for null).
template <typename scalar_t>
__global__ void gate_grad_w_kernel(const scalar_t* __restrict__ d_gated,
                                   const scalar_t* __restrict__ h_all,
                                   const int64_t* __restrict__ experts, int64_t T, int64_t E,
                                   int64_t R, int64_t K, acc_of<scalar_t> scaling,
                                   acc_of<scalar_t>* __restrict__ grad_w) {
  using acc_t = acc_of<scalar_t>;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= T * K) return;
  const int64_t e = experts[p];
  if (!is_lora(e, E)) {
    grad_w[p] = 0;
    return;
  }
  const int64_t base = (p / K) * E * R + e * R;
  acc_t dot = 0;
  for (int64_t r = 0; r < R; ++r) dot += to_acc(d_gated[base + r]) * to_acc(h_all[base + r]);
  grad_w[p] = scaling * dot;
}

unsigned grid_stride_blocks(int64_t n) {
  return static_cast<unsigned>(min64(blocks_for(n, kThreads), 65536));
}

// ---- the fused forward on tensor cores

constexpr int kBM = 64;    // tokens per block: 4 warp rows of 16
constexpr int kBK = 32;    // D columns per pipeline stage of the shrink
constexpr int kBN = 64;    // O columns per pipeline stage of the expand: 2 warp columns of 32
constexpr int kPad = 8;    // 16 bytes per shared row: ldmatrix's 8 rows hit 8 distinct bank quads

// Shared memory of the fused kernel for a padded width kER (elements of 2 bytes).
template <int kER>
struct FusedSmem {
  static constexpr int kMaxE = kER / 8;  // R >= 8
  static constexpr int kXLd = kBK + kPad, kHLd = kER + kPad;
  static constexpr size_t kGateBytes = sizeof(float) * kBM * kMaxE;
  static constexpr size_t kGatedBytes = 2 * kBM * kHLd;
  static constexpr size_t kShrinkBytes = 2 * 2 * (kBM + kER) * kXLd;  // 2 stages of x, A_all
  static constexpr size_t kExpandBytes = 2 * 2 * kBN * kHLd;          // 2 stages of B_all
  static constexpr size_t kStageBytes = kShrinkBytes > kExpandBytes ? kShrinkBytes : kExpandBytes;
  static constexpr size_t kBytes = kGateBytes + kGatedBytes + kStageBytes;
};

// The double-buffered cp.async pipeline of every tensor-core kernel here: step s's copies
// go to buffer s % 2; the caller has issued step 0 (so it can overlap it with other work),
// issue(next) enqueues and commits step next's copies, compute(stage, s) runs once every
// thread's copies of step s have landed, and the buffer is free again after it.
template <typename Issue, typename Compute>
__device__ __forceinline__ void pipelined(int steps, Issue&& issue, Compute&& compute) {
  for (int s = 0; s < steps; ++s) {
    if (s + 1 < steps) {
      issue(s + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // every thread's copies of this stage have landed
    compute(s % 2, s);
    __syncthreads();  // the stage is read before the next copies overwrite it
  }
}

// gate_s[i][e] = sum of token t0 + i's weights on LoRA expert e, in k order, for the block's
// kBM tokens (0 past T). Threads 0 .. kBM - 1; the caller syncs before reading. The scaling s
// is applied to the fp32 results at the end, not here: s * gate * h rounded to bf16 / fp16
// could overflow where the result does not.
template <int kMaxE>
__device__ __forceinline__ void load_gates(float* gate_s, const float* w, const int64_t* experts,
                                           int t0, int T, int E, int K) {
  const int i = threadIdx.x;
  if (i >= kBM) return;
  float* gate = gate_s + i * kMaxE;
  for (int e = 0; e < E; ++e) gate[e] = 0.f;
  if (t0 + i < T)
    for (int k = 0; k < K; ++k) {
      const int64_t e = experts[static_cast<int64_t>(t0 + i) * K + k];
      if (is_lora(e, E)) gate[e] += w[static_cast<int64_t>(t0 + i) * K + k];
    }
}

// x (T, D), A_all (E*R, D) = lora_A, B (E, O, R), w / experts (T, K); y (T, O), h_all (T, E*R).
// kER >= E*R, a power of two in [16, 256]; R, D, O multiples of 8, D >= 8.
// kShrink: h_all = x A_all^T is computed here and written out; without it (lora_dense_expand)
// h_all is an input, x and A are unused, and the kernel is the expand alone.
template <typename scalar_t, int kER, bool kShrink>
__global__ void __launch_bounds__(kThreads)
fused_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ A,
                     const scalar_t* __restrict__ B, const float* __restrict__ w,
                     const int64_t* __restrict__ experts, int T, int D, int O, int E, int R,
                     int K, float scaling, scalar_t* __restrict__ y,
                     scalar_t* __restrict__ h_all) {
  using S = FusedSmem<kER>;
  constexpr int kNT1 = kER / 16;  // n8 tiles of the shrink per warp (a warp column is kER / 2)
  constexpr int kNT2 = 4;         // n8 tiles of the expand per warp (32 columns)
  const int ER = E * R;
  unsigned char* smem = dynamic_shared_memory<unsigned char>();
  float* gate_s = reinterpret_cast<float*>(smem);                                   // [kBM][kMaxE]
  scalar_t* gated_s = reinterpret_cast<scalar_t*>(smem + S::kGateBytes);            // [kBM][kHLd]
  scalar_t* stage_s = reinterpret_cast<scalar_t*>(smem + S::kGateBytes + S::kGatedBytes);
  scalar_t* xs = stage_s;                          // [2][kBM][kXLd]
  scalar_t* as = stage_s + 2 * kBM * S::kXLd;      // [2][kER][kXLd]
  scalar_t* bs = stage_s;                          // [2][kBN][kHLd], after the shrink

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, q = lane % 4;  // mma fragment coordinates (group, thread in group)
  const int wr = warp % 4;               // warp row: tokens 16 wr .. 16 wr + 15
  const int wc = warp / 4;               // warp column
  const int t0 = blockIdx.x * kBM;

  load_gates<S::kMaxE>(gate_s, w, experts, t0, T, E, K);

  // Shrink: h[kBM, kER] = x[t0:, :] A_all^T over D in stages of kBK (16-byte chunks; rows
  // past T or E*R and columns past D are zero-filled).
  auto issue_shrink = [&](int stage, int k0) {
    for (int i = tid; i < (kBM + kER) * (kBK / 8); i += kThreads) {
      const int row = i / (kBK / 8), col = k0 + 8 * (i % (kBK / 8));
      const bool is_x = row < kBM;
      const int src_row = is_x ? t0 + row : row - kBM;
      const bool ok = col < D && (is_x ? src_row < T : src_row < ER);
      const scalar_t* src = (is_x ? x : A) + (ok ? static_cast<int64_t>(src_row) * D + col : 0);
      scalar_t* dst = is_x ? xs + (stage * kBM + row) * S::kXLd
                           : as + (stage * kER + src_row) * S::kXLd;
      cp_async_16(dst + col - k0, src, ok ? 16 : 0);
    }
    cp_async_commit();
  };
  float acc[kNT1][4] = {};
  if constexpr (kShrink) {
    const int steps = (D + kBK - 1) / kBK;
    issue_shrink(0, 0);
    pipelined(
        steps, [&](int next) { issue_shrink(next % 2, next * kBK); },
        [&](int stage, int s) {
          const scalar_t* xt = xs + stage * kBM * S::kXLd;
          const scalar_t* at = as + (stage * kER + wc * (kER / 2)) * S::kXLd;
          for (int kk = 0; kk < kBK; kk += 16) {
            uint32_t a[4];
            ldmatrix<4>(a, xt + (16 * wr + lane % 16) * S::kXLd + kk + 8 * (lane / 16));
            for (int j = 0; j < kNT1; ++j) {
              uint32_t b[2];
              ldmatrix<2>(b, at + (8 * j + lane % 8) * S::kXLd + kk + 8 * (lane / 8 % 2));
              mma_m16n8k16<scalar_t>(acc[j], a, b, acc[j]);
            }
          }
        });
  } else {  // h_all given: the accumulators' elements from it (0 past T or E*R)
    for (int half = 0; half < 2; ++half) {
      const int t = t0 + 16 * wr + g + 8 * half;
      for (int j = 0; j < kNT1; ++j) {
        const int c = wc * (kER / 2) + 8 * j + 2 * q;
        if (t < T && c < ER) {
          acc[j][2 * half] = to_acc(h_all[static_cast<int64_t>(t) * ER + c]);
          acc[j][2 * half + 1] = to_acc(h_all[static_cast<int64_t>(t) * ER + c + 1]);
        }
      }
    }
    __syncthreads();  // gate_s is complete (with the shrink, its pipeline's barriers order it)
  }

  // The expand's first B_all stage goes out now, under the gate epilogue below.
  auto issue_expand = [&](int stage, int o0) {
    for (int i = tid; i < kBN * (kER / 8); i += kThreads) {
      const int n = i / (kER / 8), k = 8 * (i % (kER / 8));  // k = e R + r, r % 8 == 0
      const bool ok = o0 + n < O && k < ER;
      const scalar_t* src =
          B + (ok ? (static_cast<int64_t>(k / R) * O + o0 + n) * R + k % R : 0);
      cp_async_16(bs + (stage * kBN + n) * S::kHLd + k, src, ok ? 16 : 0);
    }
    cp_async_commit();
  };
  const int o_steps = (O + kBN - 1) / kBN;
  if (o_steps > 0) issue_expand(0, 0);

  // Gate epilogue: h_all (rounded) to global memory, gated = gate * h (from the fp32
  // accumulators) to shared memory; columns past E*R hold 0 (A_all's zero-filled rows).
  for (int half = 0; half < 2; ++half) {
    const int row = 16 * wr + g + 8 * half, t = t0 + row;
    const float* gate = gate_s + row * S::kMaxE;
    for (int j = 0; j < kNT1; ++j) {
      const int c = wc * (kER / 2) + 8 * j + 2 * q;  // columns c, c + 1 (same expert: R even)
      const float v0 = acc[j][2 * half], v1 = acc[j][2 * half + 1];
      const float gv = c < ER ? gate[c / R] : 0.f;
      *reinterpret_cast<uint32_t*>(gated_s + row * S::kHLd + c) =
          pack_b16x2(from_acc<scalar_t>(gv * v0), from_acc<scalar_t>(gv * v1));
      if (kShrink && t < T && c < ER)
        *reinterpret_cast<uint32_t*>(h_all + static_cast<int64_t>(t) * ER + c) =
            pack_b16x2(from_acc<scalar_t>(v0), from_acc<scalar_t>(v1));
    }
  }

  // Expand: y[t0:, o0:o0 + kBN] = gated B_all^T, K dimension kER, over O in stages of kBN.
  pipelined(
      o_steps, [&](int next) { issue_expand(next % 2, next * kBN); },
      [&](int stage, int s) {
        const int o0 = s * kBN;
        float out[kNT2][4] = {};
        const scalar_t* bt = bs + (stage * kBN + 32 * wc) * S::kHLd;
        for (int kk = 0; kk < kER; kk += 16) {
          uint32_t a[4];
          ldmatrix<4>(a, gated_s + (16 * wr + lane % 16) * S::kHLd + kk + 8 * (lane / 16));
          for (int j = 0; j < kNT2; ++j) {
            uint32_t b[2];
            ldmatrix<2>(b, bt + (8 * j + lane % 8) * S::kHLd + kk + 8 * (lane / 8 % 2));
            mma_m16n8k16<scalar_t>(out[j], a, b, out[j]);
          }
        }
        for (int half = 0; half < 2; ++half) {
          const int t = t0 + 16 * wr + g + 8 * half;
          for (int j = 0; j < kNT2; ++j) {
            const int c = o0 + 32 * wc + 8 * j + 2 * q;  // O % 8 == 0: c + 1 < O when c < O
            if (t < T && c < O)
              *reinterpret_cast<uint32_t*>(y + static_cast<int64_t>(t) * O + c) =
                  pack_b16x2(from_acc<scalar_t>(scaling * out[j][2 * half]),
                             from_acc<scalar_t>(scaling * out[j][2 * half + 1]));
          }
        }
      });
}

template <typename scalar_t, int kER, bool kShrink>
cudaError_t launch_fused(const void* x, const void* A, const void* B, const float* w,
                         const int64_t* experts, int64_t T, int64_t D, int64_t O, int64_t E,
                         int64_t R, int64_t K, double scaling, void* y, void* h_all,
                         cudaStream_t stream) {
  constexpr size_t smem = FusedSmem<kER>::kBytes;
  constexpr auto kernel = fused_forward_kernel<scalar_t, kER, kShrink>;
  if (cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem)))
    return err;
  launch_kernel<kernel>(blocks_for(T, kBM), kThreads, smem, stream,
                        static_cast<const scalar_t*>(x), static_cast<const scalar_t*>(A),
                        static_cast<const scalar_t*>(B), w, experts, static_cast<int>(T),
                        static_cast<int>(D), static_cast<int>(O), static_cast<int>(E),
                        static_cast<int>(R), static_cast<int>(K), static_cast<float>(scaling),
                        static_cast<scalar_t*>(y), static_cast<scalar_t*>(h_all));
  return cudaGetLastError();
}

template <typename scalar_t, bool kShrink>
cudaError_t launch_fused_width(const void* x, const void* A, const void* B, const void* w,
                               const int64_t* experts, int64_t T, int64_t D, int64_t O, int64_t E,
                               int64_t R, int64_t K, double scaling, void* y, void* h_all,
                               cudaStream_t stream) {
  const float* wf = static_cast<const float*>(w);
  const int64_t ER = E * R;
  if (ER <= 16) return launch_fused<scalar_t, 16, kShrink>(x, A, B, wf, experts, T, D, O, E, R, K, scaling, y, h_all, stream);
  if (ER <= 32) return launch_fused<scalar_t, 32, kShrink>(x, A, B, wf, experts, T, D, O, E, R, K, scaling, y, h_all, stream);
  if (ER <= 64) return launch_fused<scalar_t, 64, kShrink>(x, A, B, wf, experts, T, D, O, E, R, K, scaling, y, h_all, stream);
  if (ER <= 128) return launch_fused<scalar_t, 128, kShrink>(x, A, B, wf, experts, T, D, O, E, R, K, scaling, y, h_all, stream);
  return launch_fused<scalar_t, 256, kShrink>(x, A, B, wf, experts, T, D, O, E, R, K, scaling, y, h_all, stream);
}

// ---- the backward on tensor cores, in two kernels and a fixed-order reduction

// Kernel 1's shared memory for a padded width kER.
template <int kER>
struct BackwardSmem {
  static constexpr int kMaxE = kER / 8;
  static constexpr int kYLd = kBK + kPad;  // dy stage rows: 32 of O
  static constexpr int kNLd = kER + kPad;  // B_all^T stage rows (o) and dh rows
  static constexpr int kDLd = kBN + kPad;  // A_all stage rows (e r): 64 of D
  static constexpr size_t kGateBytes = sizeof(float) * kBM * kMaxE;
  static constexpr size_t kPartBytes = sizeof(float) * 2 * kBM * kMaxE;  // dw per warp column
  static constexpr size_t kDhBytes = 2 * kBM * kNLd;
  static constexpr size_t kShrinkBytes = 2 * 2 * (kBM * kYLd + kBK * kNLd);
  static constexpr size_t kExpandBytes = 2 * 2 * kER * kDLd;
  static constexpr size_t kStageBytes = kShrinkBytes > kExpandBytes ? kShrinkBytes : kExpandBytes;
  static constexpr size_t kBytes = kGateBytes + kPartBytes + kDhBytes + kStageBytes;
};

// Kernel 1, per kBM tokens: d_gated = dy B_all (tensor cores, O in stages of kBK), then in
// registers dh = gate * d_gated and the partial dots <d_gated, h> per expert (dw), then
// dx = dh A_all (tensor cores, D in stages of kBN). Also writes dh and gated = gate * h
// (T, E*R) for kernel 2. dy (T, O), h_all (T, E*R) as lora_dense_forward returned it.
// Without kDx (lora_dense_expand_backward) there is no dx, A and dx are unused, and dh_out
// is the op's grad_h_all: s * gate * d_gated.
template <typename scalar_t, int kER, bool kDx>
__global__ void __launch_bounds__(kThreads, 1)  // one block per SM: without it sm_80 spills
fused_backward_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ A,
                      const scalar_t* __restrict__ B, const scalar_t* __restrict__ h_all,
                      const float* __restrict__ w, const int64_t* __restrict__ experts, int T,
                      int D, int O, int E, int R, int K, float scaling, scalar_t* __restrict__ dx,
                      float* __restrict__ dw, scalar_t* __restrict__ dh_out,
                      scalar_t* __restrict__ gated_out) {
  using S = BackwardSmem<kER>;
  constexpr int kNT1 = kER / 16, kNT2 = 4, kHalf = kER / 2;
  const int ER = E * R;
  unsigned char* smem = dynamic_shared_memory<unsigned char>();
  float* gate_s = reinterpret_cast<float*>(smem);                                  // [kBM][kMaxE]
  float* part_s = reinterpret_cast<float*>(smem + S::kGateBytes);                  // [2][kBM][kMaxE]
  scalar_t* dh_s = reinterpret_cast<scalar_t*>(smem + S::kGateBytes + S::kPartBytes);  // [kBM][kNLd]
  scalar_t* stage_s =
      reinterpret_cast<scalar_t*>(smem + S::kGateBytes + S::kPartBytes + S::kDhBytes);
  scalar_t* ys = stage_s;                        // [2][kBM][kYLd]
  scalar_t* bts = stage_s + 2 * kBM * S::kYLd;   // [2][kBK][kNLd]: B_all^T rows o, columns e r
  scalar_t* as = stage_s;                        // [2][kER][kDLd], after the first GEMM

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, q = lane % 4, wr = warp % 4, wc = warp / 4;
  const int t0 = blockIdx.x * kBM;
  load_gates<S::kMaxE>(gate_s, w, experts, t0, T, E, K);

  auto issue_shrink = [&](int stage, int o0) {
    for (int i = tid; i < kBM * (kBK / 8) + kBK * (kER / 8); i += kThreads) {
      if (i < kBM * (kBK / 8)) {
        const int row = i / (kBK / 8), col = o0 + 8 * (i % (kBK / 8));
        const bool ok = t0 + row < T && col < O;
        cp_async_16(ys + (stage * kBM + row) * S::kYLd + col - o0,
                    dy + (ok ? static_cast<int64_t>(t0 + row) * O + col : 0), ok ? 16 : 0);
      } else {
        const int j = i - kBM * (kBK / 8), kr = j / (kER / 8), n = 8 * (j % (kER / 8));
        const bool ok = o0 + kr < O && n < ER;  // B_all^T[o, e R + r] = B[e, o, r], 8 r at once
        cp_async_16(bts + (stage * kBK + kr) * S::kNLd + n,
                    B + (ok ? (static_cast<int64_t>(n / R) * O + o0 + kr) * R + n % R : 0),
                    ok ? 16 : 0);
      }
    }
    cp_async_commit();
  };
  float acc[kNT1][4] = {};
  const int steps = (O + kBK - 1) / kBK;
  issue_shrink(0, 0);
  pipelined(
      steps, [&](int next) { issue_shrink(next % 2, next * kBK); },
      [&](int stage, int s) {
        const scalar_t* yt = ys + stage * kBM * S::kYLd;
        const scalar_t* bt = bts + stage * kBK * S::kNLd + wc * kHalf;
        for (int kk = 0; kk < kBK; kk += 16) {
          uint32_t a[4];
          ldmatrix<4>(a, yt + (16 * wr + lane % 16) * S::kYLd + kk + 8 * (lane / 16));
          for (int j = 0; j < kNT1; ++j) {
            uint32_t b[2];  // B stored k-major (rows o): the transposing ldmatrix
            ldmatrix<2, true>(b, bt + (kk + lane % 8 + 8 * (lane / 8 % 2)) * S::kNLd + 8 * j);
            mma_m16n8k16<scalar_t>(acc[j], a, b, acc[j]);
          }
        }
      });

  auto issue_expand = [&](int stage, int d0) {
    for (int i = tid; i < kER * (kBN / 8); i += kThreads) {
      const int k = i / (kBN / 8), c = 8 * (i % (kBN / 8));
      const bool ok = k < ER && d0 + c < D;
      cp_async_16(as + (stage * kER + k) * S::kDLd + c,
                  A + (ok ? static_cast<int64_t>(k) * D + d0 + c : 0), ok ? 16 : 0);
    }
    cp_async_commit();
  };
  const int d_steps = (D + kBN - 1) / kBN;
  if (kDx) issue_expand(0, 0);

  // Epilogue of d_gated: dh = gate * d_gated (to shared memory and to dh_out), gated = gate
  // * h (to gated_out), and per (row, expert) the dot <d_gated, h> of this warp's columns:
  // summed over the quad's lanes (butterfly, the same on every lane) and over the expert's
  // n8 tiles in order, left in part_s[wc][row][e].
  for (int half = 0; half < 2; ++half) {
    const int row = 16 * wr + g + 8 * half, t = t0 + row;
    const float* gate = gate_s + row * S::kMaxE;
    float run = 0.f;
    int run_e = -1;
    auto flush = [&] {
      run += __shfl_xor_sync(kFullMask, run, 1);
      run += __shfl_xor_sync(kFullMask, run, 2);
      if (q == 0 && run_e >= 0 && run_e < E) part_s[(wc * kBM + row) * S::kMaxE + run_e] = run;
    };
    for (int j = 0; j < kNT1; ++j) {
      const int tile = wc * kHalf + 8 * j, c = tile + 2 * q, e = tile / R;  // R % 8 == 0
      if (e != run_e) {  // the same on every lane: tiles change expert together
        flush();
        run = 0.f;
        run_e = e;
      }
      const bool in = c < ER && t < T;
      float h0 = 0.f, h1 = 0.f;
      if (in) {
        h0 = to_acc(h_all[static_cast<int64_t>(t) * ER + c]);
        h1 = to_acc(h_all[static_cast<int64_t>(t) * ER + c + 1]);
      }
      const float gv = c < ER ? gate[e] : 0.f, d0 = acc[j][2 * half], d1 = acc[j][2 * half + 1];
      const float dh_scale = kDx ? gv : scaling * gv;  // grad_h_all holds the scaling
      const uint32_t dh2 =
          pack_b16x2(from_acc<scalar_t>(dh_scale * d0), from_acc<scalar_t>(dh_scale * d1));
      if (kDx) *reinterpret_cast<uint32_t*>(dh_s + row * S::kNLd + c) = dh2;
      if (in) {
        *reinterpret_cast<uint32_t*>(dh_out + static_cast<int64_t>(t) * ER + c) = dh2;
        *reinterpret_cast<uint32_t*>(gated_out + static_cast<int64_t>(t) * ER + c) =
            pack_b16x2(from_acc<scalar_t>(gv * h0), from_acc<scalar_t>(gv * h1));
      }
      run += d0 * h0 + d1 * h1;
    }
    flush();
  }
  __syncthreads();  // part_s and dh_s are complete
  // dw[t, k] = s * <d_gated_e, h_e>: the two warp columns' parts in order (only those whose
  // columns meet expert e's), 0 for null experts.
  if (tid < kBM && t0 + tid < T) {
    const int64_t t = t0 + tid;
    for (int k = 0; k < K; ++k) {
      const int64_t e = experts[t * K + k];
      float dot = 0.f;
      if (is_lora(e, E))
        for (int c = 0; c < 2; ++c)
          if (e * R < (c + 1) * kHalf && (e + 1) * R > c * kHalf)
            dot += part_s[(c * kBM + tid) * S::kMaxE + e];
      dw[t * K + k] = is_lora(e, E) ? scaling * dot : 0.f;
    }
  }
  if constexpr (!kDx) return;

  // dx = dh A_all: K dimension kER, D in stages of kBN.
  pipelined(
      d_steps, [&](int next) { issue_expand(next % 2, next * kBN); },
      [&](int stage, int s) {
        const int d0 = s * kBN;
        float out[kNT2][4] = {};
        const scalar_t* at = as + stage * kER * S::kDLd + 32 * wc;
        for (int kk = 0; kk < kER; kk += 16) {
          uint32_t a[4];
          ldmatrix<4>(a, dh_s + (16 * wr + lane % 16) * S::kNLd + kk + 8 * (lane / 16));
          for (int j = 0; j < kNT2; ++j) {
            uint32_t b[2];  // A_all stored k-major (rows e r)
            ldmatrix<2, true>(b, at + (kk + lane % 8 + 8 * (lane / 8 % 2)) * S::kDLd + 8 * j);
            mma_m16n8k16<scalar_t>(out[j], a, b, out[j]);
          }
        }
        for (int half = 0; half < 2; ++half) {
          const int t = t0 + 16 * wr + g + 8 * half;
          for (int j = 0; j < kNT2; ++j) {
            const int c = d0 + 32 * wc + 8 * j + 2 * q;
            if (t < T && c < D)
              *reinterpret_cast<uint32_t*>(dx + static_cast<int64_t>(t) * D + c) =
                  pack_b16x2(from_acc<scalar_t>(scaling * out[j][2 * half]),
                             from_acc<scalar_t>(scaling * out[j][2 * half + 1]));
          }
        }
      });
}

// Kernel 2: [dA_all | dB_all^T] = [dh^T x | gated^T dy], a tall-skinny GEMM (E*R rows, D + O
// columns, T deep). Block (column tile of kBN, token split): partial[split] (E*R, D + O)
// fp32 over the split's tokens in stages of kBK. Warps: kG row groups x kC column groups.
template <int kER>
struct WeightGradShape {
  static constexpr int kG = kER / 16 < 8 ? kER / 16 : 8;  // warp row groups of 16
  static constexpr int kC = 8 / kG;                       // warp column groups
  static constexpr int kRowIters = kER / 16 / kG;         // m16 tiles per warp
  static constexpr int kNT = kBN / 8 / kC;                // n8 tiles per warp
  static constexpr int kLLd = kER + kPad, kRLd = kBN + kPad;
  static constexpr size_t kBytes = 2 * 2 * kBK * (kLLd + kRLd);
};

template <typename scalar_t, int kER>
__global__ void __launch_bounds__(kThreads)
weight_grad_kernel(const scalar_t* __restrict__ dh, const scalar_t* __restrict__ x,
                   const scalar_t* __restrict__ gated, const scalar_t* __restrict__ dy, int T,
                   int D, int O, int ER, int split_tokens, float* __restrict__ partial) {
  using S = WeightGradShape<kER>;
  scalar_t* ls = dynamic_shared_memory<scalar_t>();  // [2][kBK][kLLd]: dh or gated rows
  scalar_t* rs = ls + 2 * kBK * S::kLLd;             // [2][kBK][kRLd]: x or dy rows
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, q = lane % 4;
  const int rg = warp % S::kG, cg = warp / S::kG;
  const int d_tiles = (D + kBN - 1) / kBN;
  const bool is_a = static_cast<int>(blockIdx.x) < d_tiles;  // dA from (dh, x), else dB from (gated, dy)
  const scalar_t* L = is_a ? dh : gated;
  const scalar_t* Rm = is_a ? x : dy;
  const int N = is_a ? D : O, c0 = kBN * (is_a ? blockIdx.x : blockIdx.x - d_tiles);
  const int out_c0 = (is_a ? 0 : D) + c0;
  const int tb = blockIdx.y * split_tokens, te = min(T, tb + split_tokens);

  auto issue = [&](int stage, int tk) {
    for (int i = tid; i < kBK * (kER / 8) + kBK * (kBN / 8); i += kThreads) {
      if (i < kBK * (kER / 8)) {
        const int r = i / (kER / 8), n = 8 * (i % (kER / 8));
        const bool ok = tk + r < te && n < ER;
        cp_async_16(ls + (stage * kBK + r) * S::kLLd + n,
                    L + (ok ? static_cast<int64_t>(tk + r) * ER + n : 0), ok ? 16 : 0);
      } else {
        const int j = i - kBK * (kER / 8), r = j / (kBN / 8), c = 8 * (j % (kBN / 8));
        const bool ok = tk + r < te && c0 + c < N;
        cp_async_16(rs + (stage * kBK + r) * S::kRLd + c,
                    Rm + (ok ? static_cast<int64_t>(tk + r) * N + c0 + c : 0), ok ? 16 : 0);
      }
    }
    cp_async_commit();
  };
  float acc[S::kRowIters][S::kNT][4] = {};
  const int steps = te > tb ? (te - tb + kBK - 1) / kBK : 0;
  if (steps > 0) issue(0, tb);
  pipelined(
      steps, [&](int next) { issue(next % 2, tb + next * kBK); },
      [&](int stage, int s) {
        const scalar_t* lt = ls + stage * kBK * S::kLLd;
        const scalar_t* rt = rs + stage * kBK * S::kRLd + cg * (kBN / S::kC);
        for (int kk = 0; kk < kBK; kk += 16) {
          for (int it = 0; it < S::kRowIters; ++it) {
            const int m0 = 16 * (rg + S::kG * it);
            uint32_t a[4];  // A = L^T: L stored k-major (rows t), the transposing ldmatrix
            ldmatrix<4, true>(a, lt + (kk + lane % 8 + 8 * (lane / 16)) * S::kLLd + m0 +
                                     8 * (lane / 8 % 2));
            for (int j = 0; j < S::kNT; ++j) {
              uint32_t b[2];
              ldmatrix<2, true>(b, rt + (kk + lane % 8 + 8 * (lane / 8 % 2)) * S::kRLd + 8 * j);
              mma_m16n8k16<scalar_t>(acc[it][j], a, b, acc[it][j]);
            }
          }
        }
      });
  const int64_t width = D + O;
  float* out = partial + static_cast<int64_t>(blockIdx.y) * ER * width;
  for (int it = 0; it < S::kRowIters; ++it)
    for (int half = 0; half < 2; ++half) {
      const int m = 16 * (rg + S::kG * it) + g + 8 * half;
      for (int j = 0; j < S::kNT; ++j) {
        const int c = cg * (kBN / S::kC) + 8 * j + 2 * q;  // N % 8 == 0: c + 1 < N when c < N
        if (m < ER && c0 + c < N) {
          out[m * width + out_c0 + c] = acc[it][j][2 * half];
          out[m * width + out_c0 + c + 1] = acc[it][j][2 * half + 1];
        }
      }
    }
}

// dA[e, r, d] and dB[e, o, r]: s times the splits' partials summed in split order.
template <typename scalar_t>
__global__ void weight_grad_reduce_kernel(const float* __restrict__ partial, int splits,
                                          int64_t ER, int64_t D, int64_t O, int64_t R,
                                          float scaling, scalar_t* __restrict__ dA,
                                          scalar_t* __restrict__ dB) {
  const int64_t width = D + O, n = ER * width;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float sum = 0.f;
    for (int s = 0; s < splits; ++s) sum += partial[s * n + i];
    sum *= scaling;
    const int64_t m = i / width, c = i % width;
    if (c < D) dA[m * D + c] = from_acc<scalar_t>(sum);
    else dB[((m / R) * O + (c - D)) * R + m % R] = from_acc<scalar_t>(sum);
  }
}

// kDx: lora_dense_backward; without it lora_dense_expand_backward (a.D = 0: kernel 2 and the
// reduction give dB alone).
template <typename scalar_t, int kER, bool kDx>
cudaError_t launch_backward(const DenseBackwardArgs& a, cudaStream_t stream) {
  constexpr size_t smem1 = BackwardSmem<kER>::kBytes, smem2 = WeightGradShape<kER>::kBytes;
  constexpr auto k1 = fused_backward_kernel<scalar_t, kER, kDx>;
  constexpr auto k2 = weight_grad_kernel<scalar_t, kER>;
  if (cudaError_t err = cudaFuncSetAttribute(k1, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem1)))
    return err;
  if (cudaError_t err = cudaFuncSetAttribute(k2, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(smem2)))
    return err;
  const auto* dy = static_cast<const scalar_t*>(a.grad_y);
  auto* dh = static_cast<scalar_t*>(a.dh);
  auto* gated = static_cast<scalar_t*>(a.gated);
  const int T = static_cast<int>(a.T), D = static_cast<int>(a.D), O = static_cast<int>(a.O);
  const int E = static_cast<int>(a.E), R = static_cast<int>(a.R), ER = E * R;
  launch_kernel<k1>(blocks_for(a.T, kBM), kThreads, smem1, stream, dy,
                    static_cast<const scalar_t*>(a.A), static_cast<const scalar_t*>(a.B),
                    static_cast<const scalar_t*>(a.h_all), static_cast<const float*>(a.w),
                    a.experts, T, D, O, E, R, static_cast<int>(a.K), static_cast<float>(a.scaling),
                    static_cast<scalar_t*>(a.dx), static_cast<float*>(a.dw), dh, gated);
  const int splits = dense_backward_splits(a.T);
  const int split_tokens = static_cast<int>((a.T + splits - 1) / splits);
  const dim3 grid2(blocks_for(a.D, kBN) + blocks_for(a.O, kBN), splits);
  launch_kernel<k2>(grid2, kThreads, smem2, stream, dh, static_cast<const scalar_t*>(a.x), gated,
                    dy, T, D, O, ER, split_tokens, static_cast<float*>(a.partial));
  launch_kernel<weight_grad_reduce_kernel<scalar_t>>(
      grid_stride_blocks(a.E * a.R * (a.D + a.O)), kThreads, 0, stream,
      static_cast<const float*>(a.partial), splits, a.E * a.R, a.D, a.O, a.R,
      static_cast<float>(a.scaling), static_cast<scalar_t*>(a.dA), static_cast<scalar_t*>(a.dB));
  return cudaGetLastError();
}

template <typename scalar_t, bool kDx>
cudaError_t launch_backward_width(const DenseBackwardArgs& a, cudaStream_t stream) {
  const int64_t ER = a.E * a.R;
  if (ER <= 16) return launch_backward<scalar_t, 16, kDx>(a, stream);
  if (ER <= 32) return launch_backward<scalar_t, 32, kDx>(a, stream);
  if (ER <= 64) return launch_backward<scalar_t, 64, kDx>(a, stream);
  if (ER <= 128) return launch_backward<scalar_t, 128, kDx>(a, stream);
  return launch_backward<scalar_t, 256, kDx>(a, stream);
}

}  // namespace

bool dense_expand_supported(DType dtype, int64_t T, int64_t O, int64_t E, int64_t R, int64_t K) {
  const bool b16 = dtype == DType::kFloat16 || dtype == DType::kBFloat16;
  return b16 && T >= 1 && E <= kDenseFusedMaxWidth && R <= kDenseFusedMaxWidth &&
         E * R <= kDenseFusedMaxWidth && R % 8 == 0 && O >= 8 && O % 8 == 0 && T < (int64_t(1) << 31) &&
         O < (int64_t(1) << 31) && K < (int64_t(1) << 31);
}

bool dense_fused_supported(DType dtype, int64_t T, int64_t D, int64_t O, int64_t E, int64_t R,
                           int64_t K) {
  return dense_expand_supported(dtype, T, O, E, R, K) && D >= 8 && D % 8 == 0 &&
         D < (int64_t(1) << 31);
}

namespace {
template <int kER>
constexpr size_t fused_shared_bytes() {
  constexpr size_t f = FusedSmem<kER>::kBytes, b = BackwardSmem<kER>::kBytes,
                   g = WeightGradShape<kER>::kBytes;
  return f > b ? (f > g ? f : g) : (b > g ? b : g);
}
}  // namespace

size_t dense_fused_shared_bytes(int64_t ER) {
  if (ER <= 16) return fused_shared_bytes<16>();
  if (ER <= 32) return fused_shared_bytes<32>();
  if (ER <= 64) return fused_shared_bytes<64>();
  if (ER <= 128) return fused_shared_bytes<128>();
  return fused_shared_bytes<256>();
}

cudaError_t launch_lora_dense_fused_forward(DType dtype, const void* x, const void* A,
                                            const void* B, const void* w, const int64_t* experts,
                                            int64_t T, int64_t D, int64_t O, int64_t E, int64_t R,
                                            int64_t K, double scaling, void* y, void* h_all,
                                            cudaStream_t stream) {
  constexpr auto bf16 = launch_fused_width<__nv_bfloat16, true>;
  constexpr auto fp16 = launch_fused_width<__half, true>;
  return (dtype == DType::kBFloat16 ? bf16 : fp16)(x, A, B, w, experts, T, D, O, E, R, K, scaling,
                                                   y, h_all, stream);
}

cudaError_t launch_lora_dense_expand_forward(DType dtype, const void* h_all, const void* B,
                                             const void* w, const int64_t* experts, int64_t T,
                                             int64_t O, int64_t E, int64_t R, int64_t K,
                                             double scaling, void* y, cudaStream_t stream) {
  constexpr auto bf16 = launch_fused_width<__nv_bfloat16, false>;
  constexpr auto fp16 = launch_fused_width<__half, false>;
  // the kernel only reads h_all without kShrink; D = 8 keeps its unused shrink bounds valid
  return (dtype == DType::kBFloat16 ? bf16 : fp16)(nullptr, nullptr, B, w, experts, T, 8, O, E,
                                                   R, K, scaling, y, const_cast<void*>(h_all),
                                                   stream);
}

int dense_backward_splits(int64_t T) {
  return static_cast<int>(T < 1024 ? 1 : T / 1024 < kDenseMaxSplits ? T / 1024 : kDenseMaxSplits);
}

cudaError_t launch_lora_dense_fused_backward(DType dtype, const DenseBackwardArgs& args,
                                             cudaStream_t stream) {
  if (dtype == DType::kBFloat16) return launch_backward_width<__nv_bfloat16, true>(args, stream);
  return launch_backward_width<__half, true>(args, stream);
}

cudaError_t launch_lora_dense_expand_backward(DType dtype, const DenseBackwardArgs& args,
                                              cudaStream_t stream) {
  DenseBackwardArgs a = args;  // no x, A, dx, dA: kernel 2 and the reduction see D = 0
  a.x = a.A = nullptr;
  a.dx = a.dA = nullptr;
  a.D = 0;
  if (dtype == DType::kBFloat16) return launch_backward_width<__nv_bfloat16, false>(a, stream);
  return launch_backward_width<__half, false>(a, stream);
}

cudaError_t launch_dense_gate(DType dtype, const void* in, const void* w, const int64_t* experts,
                              int64_t T, int64_t E, int64_t R, int64_t K, double scaling,
                              void* out, cudaStream_t stream) {
  if (T * E * R == 0) return cudaGetLastError();  // an empty grid is a launch error
  dispatch_all(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_of<scalar_t>;
    launch_kernel<gate_scale_kernel<scalar_t>>(
        grid_stride_blocks(T * E * R), kThreads, 0, stream, static_cast<const scalar_t*>(in),
        static_cast<const acc_t*>(w), experts, T, E, R, K, static_cast<acc_t>(scaling),
        static_cast<scalar_t*>(out));
  });
  return cudaGetLastError();
}

cudaError_t launch_dense_gate_grad_w(DType dtype, const void* d_gated, const void* h_all,
                                     const int64_t* experts, int64_t T, int64_t E, int64_t R,
                                     int64_t K, double scaling, void* grad_w, cudaStream_t stream) {
  if (T * K == 0) return cudaGetLastError();
  dispatch_all(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_of<scalar_t>;
    launch_kernel<gate_grad_w_kernel<scalar_t>>(
        blocks_for(T * K, kThreads), kThreads, 0, stream, static_cast<const scalar_t*>(d_gated),
        static_cast<const scalar_t*>(h_all), experts, T, E, R, K, static_cast<acc_t>(scaling),
        static_cast<acc_t*>(grad_w));
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace moe_ext
