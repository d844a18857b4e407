// CUDA ops of the sparse grouped LoRA strategy (lora_forward, lora_backward; kernels in
// lora.cu): checks, allocation and the sequence of launches on the current stream.
#include <algorithm>

#include "ops_common.h"

namespace moe_ext {
namespace cuda {
namespace {

// W_e[i, j] views of the expert weights for the grouped kernels.
// lora_A (E, R, D) as rows (r, d) and as columns (d, r); lora_B (E, O, R) likewise.
ExpertWeights a_rows(const Tensor& A) {
  return {A.mutable_data_ptr(), A.size(1) * A.size(2), A.size(2), 1};
}
ExpertWeights a_cols(const Tensor& A) {
  return {A.mutable_data_ptr(), A.size(1) * A.size(2), 1, A.size(2)};
}
ExpertWeights b_rows(const Tensor& B) {
  return {B.mutable_data_ptr(), B.size(1) * B.size(2), 1, B.size(2)};
}
ExpertWeights b_cols(const Tensor& B) {
  return {B.mutable_data_ptr(), B.size(1) * B.size(2), B.size(2), 1};
}

// Tiles of kPairTile pairs per bin, for the E + 1 bins of the pairs' alignment.
Tensor tile_map(const Tensor& offsets, int64_t E) {
  Tensor tile_start = aten::empty({E + 2}, kInt, offsets.device());
  MOE_CUDA_CHECK(launch_tile_map(offsets.mutable_data_ptr<int64_t>(), E + 1,
                                 tile_start.mutable_data_ptr<int32_t>(), current_stream()));
  return tile_start;
}

// out (T, n) = for each token, the sum over its LoRA pairs of scale_p W_e coef[p], added in
// k order in place (slot 0 writes each row, slot k > 0 adds to it).
void expand_slots(DType dtype, const Tensor& coef, const void* pair_scale, double scaling,
                  ExpertWeights W, int64_t n, const Tensor& order, const Tensor& offsets,
                  const Tensor& tile_start, int64_t E, int64_t K, Tensor& out,
                  cudaStream_t stream) {
  const int64_t T = out.size(0), R = coef.size(1);
  if (K == 0) {  // experts (T, 0): no pairs, the delta is 0 (as on the CPU)
    aten::zero_(out);
    return;
  }
  MOE_CUDA_CHECK(launch_grouped_expand(
      dtype, coef.mutable_data_ptr(), pair_scale, scaling, W, n, order.mutable_data_ptr<int64_t>(),
      offsets.mutable_data_ptr<int64_t>(), tile_start.mutable_data_ptr<int32_t>(), T, E, K, R,
      out.mutable_data_ptr(), stream));
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lora_forward_cuda(
    const Tensor& x_in, const Tensor& A_in, const Tensor& B_in,
    const Tensor& w_in, const Tensor& experts_in, double scaling,
    int64_t num_null_experts) {
  check_lora_forward_args(x_in, A_in, B_in, w_in, experts_in, scaling, num_null_experts);
  const auto guard = device_guard(x_in);
  const Tensor x = aten::contiguous(x_in), A = aten::contiguous(A_in), B = aten::contiguous(B_in),
                   w = aten::contiguous(w_in), experts = aten::contiguous(experts_in);
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
  const Tensor tile_start = tile_map(offsets, E);
  Tensor h = aten::empty({P, R}, acc, x.device());  // null pairs' rows: zeros
  MOE_CUDA_CHECK(launch_grouped_shrink(
      dtype, x.mutable_data_ptr(), D, a_rows(A), order.mutable_data_ptr<int64_t>(),
      offsets.mutable_data_ptr<int64_t>(), tile_start.mutable_data_ptr<int32_t>(),
      experts.mutable_data_ptr<int64_t>(), P, E, K, R, nullptr, h.mutable_data_ptr(), stream));
  Tensor y = aten::empty({T, O}, x.scalar_type(), x.device());
  expand_slots(dtype, h, w.mutable_data_ptr(), scaling, b_cols(B), O, order, offsets, tile_start, E,
             K, y, stream);
  return {y, h, order, offsets};  // the alignment lora_backward takes (ops.pair_alignment)
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lora_backward_cuda(
    const Tensor& grad_y_in, const Tensor& x_in, const Tensor& A_in,
    const Tensor& B_in, const Tensor& w_in, const Tensor& experts_in,
    const Tensor& order_in, const Tensor& offsets_in, const Tensor& h_in,
    double scaling, int64_t num_null_experts) {
  check_lora_backward_args(grad_y_in, x_in, A_in, B_in, w_in, experts_in, order_in, offsets_in,
                           h_in, scaling, num_null_experts);
  const auto guard = device_guard(x_in);
  const auto acc = acc_type_of(x_in.scalar_type());
  const Tensor x = aten::contiguous(x_in), A = aten::contiguous(A_in), B = aten::contiguous(B_in),
               w = aten::contiguous(w_in), experts = aten::contiguous(experts_in),
               h = aten::contiguous(aten::to(h_in, acc)),
               dy = aten::contiguous(aten::to(grad_y_in, x.scalar_type()));
  const int64_t T = x.size(0), D = x.size(1), E = A.size(0), R = A.size(1), O = B.size(1),
                K = experts.size(1), P = T * K;
  check_int32_range(P, "the number of (token, k) pairs");
  check_columns(D, "D");
  check_columns(O, "O");
  if (debug_checks()) {
    const Tensor e = aten::to_cpu(experts), o = aten::to_cpu(aten::contiguous(order_in)),
                 f = aten::to_cpu(aten::contiguous(offsets_in));
    check_pair_alignment(e.mutable_data_ptr<int64_t>(), o.mutable_data_ptr<int64_t>(),
                         f.mutable_data_ptr<int64_t>(), P, E, E + num_null_experts);
  }
  // Without the debug checks nothing is read back, but the kernels index with order and
  // offsets: clamped on the device (three small launches, no sync; valid ones are unchanged),
  // wrong ones can only give wrong gradients, never an access out of bounds. Offsets then run
  // from [0, P] without decreasing, so the tiles also stay within the grid's upper bound.
  const Tensor offsets = aten::contiguous(aten::cummax_values(aten::clamp(offsets_in, 0, P)));
  const Tensor order =
      P > 0 ? aten::contiguous(aten::clamp(order_in, 0, P - 1)) : aten::contiguous(order_in);
  const DType dtype = dtype_of(x.scalar_type());
  const cudaStream_t stream = current_stream();
  const int64_t* ord = order.mutable_data_ptr<int64_t>();
  const int64_t* off = offsets.mutable_data_ptr<int64_t>();
  const Tensor tile_start = tile_map(offsets, E);
  const int32_t* tiles = tile_start.mutable_data_ptr<int32_t>();

  // gh[p] = B_e^T dy[t], and in the same kernel dh = s * w * gh and dw = s <gh, h> per pair.
  const int64_t* ids = experts.mutable_data_ptr<int64_t>();
  Tensor dw = aten::empty({T, K}, w.scalar_type(), w.device());
  Tensor dh = aten::empty({P, R}, w.scalar_type(), w.device());
  const PairGrads grads{h.mutable_data_ptr(), w.mutable_data_ptr(), scaling, dw.mutable_data_ptr()};
  MOE_CUDA_CHECK(launch_grouped_shrink(dtype, dy.mutable_data_ptr(), O, b_rows(B), ord, off, tiles,
                                       ids, P, E, K, R, &grads, dh.mutable_data_ptr(), stream));
  // dx[t] = sum_k A_e^T dh[t, k].
  Tensor dx = aten::empty_like(x);
  expand_slots(dtype, dh, nullptr, 1.0, a_cols(A), D, order, offsets, tile_start, E, K, dx,
               stream);
  // dA_e = sum_p dh[p] x[t]^T; dB_e = sum_p dy[t] (s w_p h[p])^T, per (expert, pair chunk).
  Tensor chunk_map = aten::empty({3 * (E + 1)}, kInt, offsets.device());
  MOE_CUDA_CHECK(launch_grad_chunk_map(off, P, E, chunk_map.mutable_data_ptr<int32_t>(), stream));
  const int32_t* chunks = chunk_map.mutable_data_ptr<int32_t>();
  Tensor spill =
      aten::empty({max_grad_spill_slots(P) * R * std::max(D, O)}, w.scalar_type(), w.device());
  Tensor dA = aten::empty_like(A);
  MOE_CUDA_CHECK(launch_weight_grad(
      dtype, dh.mutable_data_ptr(), nullptr, 1.0, x.mutable_data_ptr(), D, ord, off, chunks, ids, P,
      E, K, R, spill.mutable_data_ptr(), dA.mutable_data_ptr(), R * D, D, 1, stream));
  Tensor dB = aten::empty_like(B);
  MOE_CUDA_CHECK(launch_weight_grad(dtype, h.mutable_data_ptr(), w.mutable_data_ptr(), scaling,
                                    dy.mutable_data_ptr(), O, ord, off, chunks, ids, P, E, K, R,
                                    spill.mutable_data_ptr(), dB.mutable_data_ptr(), O * R, 1, R,
                                    stream));
  return {dx, dw, dA, dB};
}

}  // namespace
}  // namespace cuda
}  // namespace moe_ext

STABLE_TORCH_LIBRARY_IMPL(moe_ext, CUDA, m) {
  m.impl("lora_forward", TORCH_BOX(&moe_ext::cuda::lora_forward_cuda));
  m.impl("lora_backward", TORCH_BOX(&moe_ext::cuda::lora_backward_cuda));
}
