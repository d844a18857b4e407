// CUDA ops of the dense-gated strategy (lora_dense_forward, lora_dense_backward, and
// lora_dense_expand, lora_dense_expand_backward: the same from a given h_all; kernels in
// lora_dense.cu): checks, allocation and the launches on the current stream, no host sync.
// Every op: the fused tensor-core kernels where dense_fused_supported (dense_expand_supported)
// says so (bf16 / fp16, E*R <= 256, R, D, O multiples of 8, 16-byte aligned data), else
// cuBLAS GEMMs around the SIMT gate kernels, in the accumulation dtype.
#include <cuda_runtime_api.h>
#include "ops_common.h"

namespace moe_ext {
namespace cuda {
namespace {

bool aligned16(const Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

// The fused kernels' shared memory fits the current device's per-block opt-in limit.
bool fused_fits_device(int64_t ER) {
  int limit = 0;  // an attribute query, no synchronisation
  MOE_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        current_device()));
  return dense_fused_shared_bytes(ER) <= static_cast<size_t>(limit);
}

// B_all (O, E*R): B_all[o, e*R + r] = lora_B[e, o, r] (a copy of the weights).
Tensor b_all(const Tensor& B) {
  return aten::reshape(aten::permute(B, {1, 0, 2}), {B.size(1), B.size(0) * B.size(2)});
}

Tensor gate(const Tensor& in, const Tensor& w, const Tensor& ex, int64_t E,
                int64_t R, double scaling) {
  Tensor out = aten::empty_like(in);
  MOE_CUDA_CHECK(launch_dense_gate(dtype_of(in.scalar_type()), in.mutable_data_ptr(),
                                   w.mutable_data_ptr(), ex.mutable_data_ptr<int64_t>(), in.size(0),
                                   E, R, ex.size(1), scaling, out.mutable_data_ptr(),
                                   current_stream()));
  return out;
}

// The generic expand, in acc (h: h_all in acc): y (T, O) = s * gate(h) B_all^T.
Tensor expand_generic(const Tensor& h, const Tensor& B, const Tensor& w,
                          const Tensor& ex, int64_t E, int64_t R, double scaling) {
  return aten::mm(gate(h, w, ex, E, R, scaling), aten::t2(aten::to(b_all(B), h.scalar_type())));
}

// The generic expand's gradients, in acc (dy, h in acc): dh = s * gate * d_gated, dw, dB.
struct ExpandGrads {
  Tensor dh, dw, dB;
};

ExpandGrads expand_backward_generic(const Tensor& dy, const Tensor& h,
                                    const Tensor& B, const Tensor& w,
                                    const Tensor& ex, int64_t E, int64_t R, double scaling) {
  const ScalarType acc = h.scalar_type();
  const int64_t T = h.size(0), O = B.size(1), K = ex.size(1);
  const Tensor d_gated = aten::mm(dy, aten::to(b_all(B), acc));  // (T, E*R)
  Tensor dw = aten::empty_like(w);
  MOE_CUDA_CHECK(launch_dense_gate_grad_w(dtype_of(acc), d_gated.mutable_data_ptr(),
                                          h.mutable_data_ptr(), ex.mutable_data_ptr<int64_t>(), T,
                                          E, R, K, scaling, dw.mutable_data_ptr(),
                                          current_stream()));
  Tensor dB = aten::permute(
      aten::view(aten::mm(aten::t2(dy), gate(h, w, ex, E, R, scaling)), {O, E, R}), {1, 0, 2});
  return {gate(d_gated, w, ex, E, R, scaling), dw, dB};
}

std::tuple<Tensor, Tensor> lora_dense_forward_cuda(const Tensor& x_in, const Tensor& A_in,
                                                   const Tensor& B_in, const Tensor& w_in,
                                                   const Tensor& experts_in, double scaling,
                                                   int64_t num_null_experts) {
  check_lora_forward_args(x_in, A_in, B_in, w_in, experts_in, scaling, num_null_experts);
  const auto guard = device_guard(x_in);
  const Tensor x = aten::contiguous(x_in), A = aten::contiguous(A_in), B = aten::contiguous(B_in),
                   w = aten::contiguous(w_in), ex = aten::contiguous(experts_in);
  debug_check_ids(ex, A.size(0) + num_null_experts, "experts");
  const int64_t T = x.size(0), D = x.size(1), E = A.size(0), R = A.size(1), O = B.size(1),
                K = ex.size(1);
  const DType dt = dtype_of(x.scalar_type());
  if (dense_fused_supported(dt, T, D, O, E, R, K) && fused_fits_device(E * R) &&
      aligned16(x) && aligned16(A) &&
      aligned16(B)) {
    Tensor y = aten::empty({T, O}, x.scalar_type(), x.device()),
           h_all = aten::empty({T, E * R}, x.scalar_type(), x.device());
    MOE_CUDA_CHECK(launch_lora_dense_fused_forward(
        dt, x.mutable_data_ptr(), A.mutable_data_ptr(), B.mutable_data_ptr(), w.mutable_data_ptr(),
        ex.mutable_data_ptr<int64_t>(), T, D, O, E, R, K, scaling, y.mutable_data_ptr(),
        h_all.mutable_data_ptr(), current_stream()));
    return {y, h_all};
  }
  // cuBLAS path: GEMMs and gate in the accumulation dtype (no-ops for fp32 / fp64), so a
  // bf16 / fp16 gated h cannot overflow where y does not.
  const ScalarType acc = acc_type_of(x.scalar_type());
  const Tensor h_all =
      aten::mm(aten::to(x, acc), aten::t2(aten::to(aten::view(A, {E * R, D}), acc)));
  const Tensor y = expand_generic(h_all, B, w, ex, E, R, scaling);
  return {aten::to(y, x.scalar_type()), aten::to(h_all, x.scalar_type())};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lora_dense_backward_cuda(
    const Tensor& grad_y_in, const Tensor& x_in, const Tensor& A_in,
    const Tensor& B_in, const Tensor& w_in, const Tensor& experts_in,
    const Tensor& h_all_in, double scaling, int64_t num_null_experts) {
  check_lora_dense_backward_args(grad_y_in, x_in, A_in, B_in, w_in, experts_in, h_all_in, scaling,
                                 num_null_experts);
  const auto guard = device_guard(x_in);
  const ScalarType st = x_in.scalar_type();
  const Tensor x = aten::contiguous(x_in), A = aten::contiguous(A_in), w = aten::contiguous(w_in),
               ex = aten::contiguous(experts_in), dy = aten::contiguous(aten::to(grad_y_in, st)),
               h = aten::contiguous(aten::to(h_all_in, st));
  debug_check_ids(ex, A.size(0) + num_null_experts, "experts");
  const int64_t T = x.size(0), D = x.size(1), E = A.size(0), R = A.size(1), O = B_in.size(1),
                K = ex.size(1);
  const DType dt = dtype_of(st);
  const Tensor B = aten::contiguous(B_in);
  if (dense_fused_supported(dt, T, D, O, E, R, K) && fused_fits_device(E * R) &&
      aligned16(x) && aligned16(A) &&
      aligned16(B) && aligned16(dy) && aligned16(h)) {
    Tensor dx = aten::empty_like(x), dw = aten::empty_like(w), dA = aten::empty_like(A),
               dB = aten::empty_like(B);
    const Tensor dh = aten::empty_like(h), gated = aten::empty_like(h);
    const Tensor partial =
        aten::empty({dense_backward_splits(T), E * R, D + O}, kFloat, x.device());
    const DenseBackwardArgs args{dy.mutable_data_ptr(),
                                 x.mutable_data_ptr(),
                                 A.mutable_data_ptr(),
                                 B.mutable_data_ptr(),
                                 h.mutable_data_ptr(),
                                 w.mutable_data_ptr(),
                                 ex.mutable_data_ptr<int64_t>(),
                                 T,
                                 D,
                                 O,
                                 E,
                                 R,
                                 K,
                                 scaling,
                                 dx.mutable_data_ptr(),
                                 dw.mutable_data_ptr(),
                                 dA.mutable_data_ptr(),
                                 dB.mutable_data_ptr(),
                                 dh.mutable_data_ptr(),
                                 gated.mutable_data_ptr(),
                                 partial.mutable_data_ptr()};
    MOE_CUDA_CHECK(launch_lora_dense_fused_backward(dt, args, current_stream()));
    return {dx, dw, dA, dB};
  }
  // cuBLAS path, everything in the accumulation dtype as in the forward.
  const ScalarType acc = acc_type_of(st);
  const ExpandGrads g =
      expand_backward_generic(aten::to(dy, acc), aten::to(h, acc), B, w, ex, E, R, scaling);
  Tensor dx = aten::to(aten::mm(g.dh, aten::to(aten::view(A, {E * R, D}), acc)), st);
  Tensor dA = aten::to(aten::view(aten::mm(aten::t2(g.dh), aten::to(x, acc)), {E, R, D}), st);
  return {dx, g.dw, dA, aten::contiguous(aten::to(g.dB, st))};
}

Tensor lora_dense_expand_cuda(const Tensor& h_all_in, const Tensor& B_in,
                                  const Tensor& w_in, const Tensor& experts_in,
                                  double scaling, int64_t num_null_experts) {
  check_lora_dense_expand_args(h_all_in, B_in, w_in, experts_in, scaling, num_null_experts);
  const auto guard = device_guard(h_all_in);
  const Tensor h = aten::contiguous(h_all_in), B = aten::contiguous(B_in),
               w = aten::contiguous(w_in), ex = aten::contiguous(experts_in);
  debug_check_ids(ex, B.size(0) + num_null_experts, "experts");
  const int64_t T = h.size(0), E = B.size(0), O = B.size(1), R = B.size(2), K = ex.size(1);
  const DType dt = dtype_of(h.scalar_type());
  if (dense_expand_supported(dt, T, O, E, R, K) && fused_fits_device(E * R) && aligned16(h) &&
      aligned16(B)) {
    Tensor y = aten::empty({T, O}, h.scalar_type(), h.device());
    MOE_CUDA_CHECK(
        launch_lora_dense_expand_forward(dt, h.mutable_data_ptr(), B.mutable_data_ptr(),
                                         w.mutable_data_ptr(), ex.mutable_data_ptr<int64_t>(), T, O,
                                         E, R, K, scaling, y.mutable_data_ptr(), current_stream()));
    return y;
  }
  const ScalarType acc = acc_type_of(h.scalar_type());
  return aten::to(expand_generic(aten::to(h, acc), B, w, ex, E, R, scaling), h.scalar_type());
}

std::tuple<Tensor, Tensor, Tensor> lora_dense_expand_backward_cuda(
    const Tensor& grad_y_in, const Tensor& h_all_in, const Tensor& B_in,
    const Tensor& w_in, const Tensor& experts_in, double scaling,
    int64_t num_null_experts) {
  check_lora_dense_expand_backward_args(grad_y_in, h_all_in, B_in, w_in, experts_in, scaling,
                                        num_null_experts);
  const auto guard = device_guard(h_all_in);
  const ScalarType st = h_all_in.scalar_type();
  const Tensor h = aten::contiguous(h_all_in), B = aten::contiguous(B_in),
               w = aten::contiguous(w_in), ex = aten::contiguous(experts_in),
               dy = aten::contiguous(aten::to(grad_y_in, st));
  debug_check_ids(ex, B.size(0) + num_null_experts, "experts");
  const int64_t T = h.size(0), E = B.size(0), O = B.size(1), R = B.size(2), K = ex.size(1);
  const DType dt = dtype_of(st);
  if (dense_expand_supported(dt, T, O, E, R, K) && fused_fits_device(E * R) && aligned16(h) &&
      aligned16(B) && aligned16(dy)) {
    Tensor dh = aten::empty_like(h), dw = aten::empty_like(w), dB = aten::empty_like(B);
    const Tensor gated = aten::empty_like(h);
    const Tensor partial =
        aten::empty({dense_backward_splits(T), E * R, O}, kFloat, h.device());
    const DenseBackwardArgs args{dy.mutable_data_ptr(),
                                 nullptr,
                                 nullptr,
                                 B.mutable_data_ptr(),
                                 h.mutable_data_ptr(),
                                 w.mutable_data_ptr(),
                                 ex.mutable_data_ptr<int64_t>(),
                                 T,
                                 0,
                                 O,
                                 E,
                                 R,
                                 K,
                                 scaling,
                                 nullptr,
                                 dw.mutable_data_ptr(),
                                 nullptr,
                                 dB.mutable_data_ptr(),
                                 dh.mutable_data_ptr(),
                                 gated.mutable_data_ptr(),
                                 partial.mutable_data_ptr()};
    MOE_CUDA_CHECK(launch_lora_dense_expand_backward(dt, args, current_stream()));
    return {dh, dw, dB};
  }
  const ScalarType acc = acc_type_of(st);
  const ExpandGrads g =
      expand_backward_generic(aten::to(dy, acc), aten::to(h, acc), B, w, ex, E, R, scaling);
  return {aten::to(g.dh, st), g.dw, aten::contiguous(aten::to(g.dB, st))};
}

}  // namespace
}  // namespace cuda
}  // namespace moe_ext

STABLE_TORCH_LIBRARY_IMPL(moe_ext, CUDA, m) {
  m.impl("lora_dense_forward", TORCH_BOX(&moe_ext::cuda::lora_dense_forward_cuda));
  m.impl("lora_dense_backward", TORCH_BOX(&moe_ext::cuda::lora_dense_backward_cuda));
  m.impl("lora_dense_expand", TORCH_BOX(&moe_ext::cuda::lora_dense_expand_cuda));
  m.impl("lora_dense_expand_backward", TORCH_BOX(&moe_ext::cuda::lora_dense_expand_backward_cuda));
}
