// CUDA ops of the sparse grouped LoRA strategy (lora_forward, lora_backward; kernels in
// lora.cu): checks, allocation and the sequence of launches on the current stream.
#include <torch/library.h>

#include <algorithm>

#include "ops_common.h"

namespace moe_ext {
namespace cuda {
namespace {

// W_e[i, j] views of the expert weights for the grouped kernels.
// lora_A (E, R, D) as rows (r, d) and as columns (d, r); lora_B (E, O, R) likewise.
ExpertWeights a_rows(const at::Tensor& A) { return {A.data_ptr(), A.size(1) * A.size(2), A.size(2), 1}; }
ExpertWeights a_cols(const at::Tensor& A) { return {A.data_ptr(), A.size(1) * A.size(2), 1, A.size(2)}; }
ExpertWeights b_rows(const at::Tensor& B) { return {B.data_ptr(), B.size(1) * B.size(2), 1, B.size(2)}; }
ExpertWeights b_cols(const at::Tensor& B) { return {B.data_ptr(), B.size(1) * B.size(2), B.size(2), 1}; }

// Tiles of kPairTile pairs per bin, for the E + 1 bins of the pairs' alignment.
at::Tensor tile_map(const at::Tensor& offsets, int64_t E) {
  at::Tensor tile_start = at::empty({E + 2}, offsets.options().dtype(at::kInt));
  C10_CUDA_CHECK(launch_tile_map(offsets.data_ptr<int64_t>(), E + 1, tile_start.data_ptr<int32_t>(),
                                 current_stream()));
  return tile_start;
}

// out (T, n) = for each token, the sum over its LoRA pairs of scale_p W_e coef[p], added in
// k order in place (slot 0 writes each row, slot k > 0 adds to it).
void expand_slots(DType dtype, const at::Tensor& coef, const void* pair_scale, double scaling,
                  ExpertWeights W, int64_t n, const at::Tensor& order, const at::Tensor& offsets,
                  const at::Tensor& tile_start, int64_t E, int64_t K, at::Tensor& out,
                  cudaStream_t stream) {
  const int64_t T = out.size(0), R = coef.size(1);
  if (K == 0) {  // experts (T, 0): no pairs, the delta is 0 (as on the CPU)
    out.zero_();
    return;
  }
  C10_CUDA_CHECK(launch_grouped_expand(dtype, coef.data_ptr(), pair_scale, scaling, W, n,
                                       order.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
                                       tile_start.data_ptr<int32_t>(), T, E, K, R, out.data_ptr(),
                                       stream));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_forward_cuda(
    const at::Tensor& x_in, const at::Tensor& A_in, const at::Tensor& B_in,
    const at::Tensor& w_in, const at::Tensor& experts_in, double scaling,
    int64_t num_null_experts) {
  check_lora_forward_args(x_in, A_in, B_in, w_in, experts_in, scaling, num_null_experts);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), A = A_in.contiguous(), B = B_in.contiguous(),
                   w = w_in.contiguous(), experts = experts_in.contiguous();
  const int64_t T = x.size(0), D = x.size(1), E = A.size(0), R = A.size(1), O = B.size(1),
                K = experts.size(1), P = T * K;
  check_columns(D, "D");
  check_columns(O, "O");
  const DType dtype = dtype_of(x.scalar_type());
  const auto acc = acc_type_of(x.scalar_type());
  const cudaStream_t stream = current_stream();

  debug_check_ids(experts, E + num_null_experts, "experts");
  // Bins 0..E-1 for the LoRA experts, bin E for every null expert (and any bad id).
  auto [order, offsets] = align_unchecked_ids(experts, E + 1);
  const at::Tensor tile_start = tile_map(offsets, E);
  at::Tensor h = at::empty({P, R}, x.options().dtype(acc));  // null pairs' rows: zeros
  C10_CUDA_CHECK(launch_grouped_shrink(dtype, x.data_ptr(), D, a_rows(A), order.data_ptr<int64_t>(),
                                       offsets.data_ptr<int64_t>(), tile_start.data_ptr<int32_t>(),
                                       experts.data_ptr<int64_t>(), P, E, K, R, nullptr,
                                       h.data_ptr(), stream));
  at::Tensor y = at::empty({T, O}, x.options());
  expand_slots(dtype, h, w.data_ptr(), scaling, b_cols(B), O, order, offsets, tile_start, E,
             K, y, stream);
  return {y, h, order, offsets};  // the alignment lora_backward takes (ops.pair_alignment)
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_backward_cuda(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& A_in,
    const at::Tensor& B_in, const at::Tensor& w_in, const at::Tensor& experts_in,
    const at::Tensor& order_in, const at::Tensor& offsets_in, const at::Tensor& h_in,
    double scaling, int64_t num_null_experts) {
  check_lora_backward_args(grad_y_in, x_in, A_in, B_in, w_in, experts_in, order_in, offsets_in,
                           h_in, scaling, num_null_experts);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto acc = acc_type_of(x_in.scalar_type());
  const at::Tensor x = x_in.contiguous(), A = A_in.contiguous(), B = B_in.contiguous(),
                   w = w_in.contiguous(), experts = experts_in.contiguous(),
                   h = h_in.to(acc).contiguous(), dy = grad_y_in.to(x.scalar_type()).contiguous();
  const int64_t T = x.size(0), D = x.size(1), E = A.size(0), R = A.size(1), O = B.size(1),
                K = experts.size(1), P = T * K;
  check_int32_range(P, "the number of (token, k) pairs");
  check_columns(D, "D");
  check_columns(O, "O");
  if (debug_checks()) {
    const at::Tensor e = experts.cpu(), o = order_in.contiguous().cpu(),
                     f = offsets_in.contiguous().cpu();
    check_pair_alignment(e.data_ptr<int64_t>(), o.data_ptr<int64_t>(), f.data_ptr<int64_t>(), P,
                         E, E + num_null_experts);
  }
  // Without the debug checks nothing is read back, but the kernels index with order and
  // offsets: clamped on the device (three small launches, no sync; valid ones are unchanged),
  // wrong ones can only give wrong gradients, never an access out of bounds. Offsets then run
  // from [0, P] without decreasing, so the tiles also stay within the grid's upper bound.
  const at::Tensor offsets = std::get<0>(at::cummax(offsets_in.clamp(0, P), 0)).contiguous();
  const at::Tensor order = P > 0 ? order_in.clamp(0, P - 1).contiguous() : order_in.contiguous();
  const DType dtype = dtype_of(x.scalar_type());
  const cudaStream_t stream = current_stream();
  const int64_t* ord = order.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const at::Tensor tile_start = tile_map(offsets, E);
  const int32_t* tiles = tile_start.data_ptr<int32_t>();

  // gh[p] = B_e^T dy[t], and in the same kernel dh = s * w * gh and dw = s <gh, h> per pair.
  const int64_t* ids = experts.data_ptr<int64_t>();
  at::Tensor dw = at::empty({T, K}, w.options());
  at::Tensor dh = at::empty({P, R}, w.options());
  const PairGrads grads{h.data_ptr(), w.data_ptr(), scaling, dw.data_ptr()};
  C10_CUDA_CHECK(launch_grouped_shrink(dtype, dy.data_ptr(), O, b_rows(B), ord, off, tiles, ids, P,
                                       E, K, R, &grads, dh.data_ptr(), stream));
  // dx[t] = sum_k A_e^T dh[t, k].
  at::Tensor dx = at::empty_like(x);
  expand_slots(dtype, dh, nullptr, 1.0, a_cols(A), D, order, offsets, tile_start, E, K, dx,
               stream);
  // dA_e = sum_p dh[p] x[t]^T; dB_e = sum_p dy[t] (s w_p h[p])^T, per (expert, pair chunk).
  at::Tensor chunk_map = at::empty({3 * (E + 1)}, offsets.options().dtype(at::kInt));
  C10_CUDA_CHECK(launch_grad_chunk_map(off, P, E, chunk_map.data_ptr<int32_t>(), stream));
  const int32_t* chunks = chunk_map.data_ptr<int32_t>();
  at::Tensor spill = at::empty({max_grad_spill_slots(P) * R * std::max(D, O)}, w.options());
  at::Tensor dA = at::empty_like(A);
  C10_CUDA_CHECK(launch_weight_grad(dtype, dh.data_ptr(), nullptr, 1.0, x.data_ptr(), D, ord, off,
                                    chunks, ids, P, E, K, R, spill.data_ptr(), dA.data_ptr(),
                                    R * D, D, 1, stream));
  at::Tensor dB = at::empty_like(B);
  C10_CUDA_CHECK(launch_weight_grad(dtype, h.data_ptr(), w.data_ptr(), scaling, dy.data_ptr(), O,
                                    ord, off, chunks, ids, P, E, K, R, spill.data_ptr(),
                                    dB.data_ptr(), O * R, 1, R, stream));
  return {dx, dw, dA, dB};
}

}  // namespace
}  // namespace cuda
}  // namespace moe_ext

TORCH_LIBRARY_IMPL(moe_ext, CUDA, m) {
  m.impl("lora_forward", &moe_ext::cuda::lora_forward_cuda);
  m.impl("lora_backward", &moe_ext::cuda::lora_backward_cuda);
}
