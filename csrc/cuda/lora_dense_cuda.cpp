// CUDA ops of the dense-gated strategy (lora_dense_forward, lora_dense_backward, and
// lora_dense_expand, lora_dense_expand_backward: the same from a given h_all; kernels in
// lora_dense.cu): checks, allocation and the launches on the current stream, no host sync.
// Every op: the fused tensor-core kernels where dense_fused_supported (dense_expand_supported)
// says so (bf16 / fp16, E*R <= 256, R, D, O multiples of 8, 16-byte aligned data), else
// cuBLAS GEMMs around the SIMT gate kernels, in the accumulation dtype.
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "ops_common.h"

namespace moe_ext {
namespace cuda {
namespace {

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// The fused kernels' shared memory fits the current device's per-block opt-in limit.
bool fused_fits_device(int64_t ER) {
  int limit = 0;  // an attribute query, no synchronisation
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        c10::cuda::current_device()));
  return dense_fused_shared_bytes(ER) <= static_cast<size_t>(limit);
}

// B_all (O, E*R): B_all[o, e*R + r] = lora_B[e, o, r] (a copy of the weights).
at::Tensor b_all(const at::Tensor& B) {
  return B.permute({1, 0, 2}).reshape({B.size(1), B.size(0) * B.size(2)});
}

at::Tensor gate(const at::Tensor& in, const at::Tensor& w, const at::Tensor& ex, int64_t E,
                int64_t R, double scaling) {
  at::Tensor out = at::empty_like(in);
  C10_CUDA_CHECK(launch_dense_gate(dtype_of(in.scalar_type()), in.data_ptr(), w.data_ptr(),
                                   ex.data_ptr<int64_t>(), in.size(0), E, R, ex.size(1), scaling,
                                   out.data_ptr(), current_stream()));
  return out;
}

// The generic expand, in acc (h: h_all in acc): y (T, O) = s * gate(h) B_all^T.
at::Tensor expand_generic(const at::Tensor& h, const at::Tensor& B, const at::Tensor& w,
                          const at::Tensor& ex, int64_t E, int64_t R, double scaling) {
  return at::mm(gate(h, w, ex, E, R, scaling), b_all(B).to(h.scalar_type()).t());
}

// The generic expand's gradients, in acc (dy, h in acc): dh = s * gate * d_gated, dw, dB.
struct ExpandGrads {
  at::Tensor dh, dw, dB;
};

ExpandGrads expand_backward_generic(const at::Tensor& dy, const at::Tensor& h,
                                    const at::Tensor& B, const at::Tensor& w,
                                    const at::Tensor& ex, int64_t E, int64_t R, double scaling) {
  const at::ScalarType acc = h.scalar_type();
  const int64_t T = h.size(0), O = B.size(1), K = ex.size(1);
  const at::Tensor d_gated = at::mm(dy, b_all(B).to(acc));  // (T, E*R)
  at::Tensor dw = at::empty_like(w);
  C10_CUDA_CHECK(launch_dense_gate_grad_w(dtype_of(acc), d_gated.data_ptr(), h.data_ptr(),
                                          ex.data_ptr<int64_t>(), T, E, R, K, scaling,
                                          dw.data_ptr(), current_stream()));
  at::Tensor dB = at::mm(dy.t(), gate(h, w, ex, E, R, scaling)).view({O, E, R}).permute({1, 0, 2});
  return {gate(d_gated, w, ex, E, R, scaling), dw, dB};
}

std::tuple<at::Tensor, at::Tensor> lora_dense_forward_cuda(const at::Tensor& x_in,
                                                           const at::Tensor& A_in,
                                                           const at::Tensor& B_in,
                                                           const at::Tensor& w_in,
                                                           const at::Tensor& experts_in,
                                                           double scaling, int64_t num_null_experts) {
  check_lora_forward_args(x_in, A_in, B_in, w_in, experts_in, scaling, num_null_experts);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), A = A_in.contiguous(), B = B_in.contiguous(),
                   w = w_in.contiguous(), ex = experts_in.contiguous();
  debug_check_ids(ex, A.size(0) + num_null_experts, "experts");
  const int64_t T = x.size(0), D = x.size(1), E = A.size(0), R = A.size(1), O = B.size(1),
                K = ex.size(1);
  const DType dt = dtype_of(x.scalar_type());
  if (dense_fused_supported(dt, T, D, O, E, R, K) && fused_fits_device(E * R) &&
      aligned16(x) && aligned16(A) &&
      aligned16(B)) {
    at::Tensor y = at::empty({T, O}, x.options()), h_all = at::empty({T, E * R}, x.options());
    C10_CUDA_CHECK(launch_lora_dense_fused_forward(dt, x.data_ptr(), A.data_ptr(), B.data_ptr(),
                                                   w.data_ptr(), ex.data_ptr<int64_t>(), T, D, O,
                                                   E, R, K, scaling, y.data_ptr(), h_all.data_ptr(),
                                                   current_stream()));
    return {y, h_all};
  }
  // cuBLAS path: GEMMs and gate in the accumulation dtype (no-ops for fp32 / fp64), so a
  // bf16 / fp16 gated h cannot overflow where y does not.
  const at::ScalarType acc = acc_type_of(x.scalar_type());
  const at::Tensor h_all = at::mm(x.to(acc), A.view({E * R, D}).to(acc).t());
  const at::Tensor y = expand_generic(h_all, B, w, ex, E, R, scaling);
  return {y.to(x.scalar_type()), h_all.to(x.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_dense_backward_cuda(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& A_in,
    const at::Tensor& B_in, const at::Tensor& w_in, const at::Tensor& experts_in,
    const at::Tensor& h_all_in, double scaling, int64_t num_null_experts) {
  check_lora_dense_backward_args(grad_y_in, x_in, A_in, B_in, w_in, experts_in, h_all_in, scaling,
                                 num_null_experts);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::ScalarType st = x_in.scalar_type();
  const at::Tensor x = x_in.contiguous(), A = A_in.contiguous(), w = w_in.contiguous(),
                   ex = experts_in.contiguous(), dy = grad_y_in.to(st).contiguous(),
                   h = h_all_in.to(st).contiguous();
  debug_check_ids(ex, A.size(0) + num_null_experts, "experts");
  const int64_t T = x.size(0), D = x.size(1), E = A.size(0), R = A.size(1), O = B_in.size(1),
                K = ex.size(1);
  const DType dt = dtype_of(st);
  const at::Tensor B = B_in.contiguous();
  if (dense_fused_supported(dt, T, D, O, E, R, K) && fused_fits_device(E * R) &&
      aligned16(x) && aligned16(A) &&
      aligned16(B) && aligned16(dy) && aligned16(h)) {
    at::Tensor dx = at::empty_like(x), dw = at::empty_like(w), dA = at::empty_like(A),
               dB = at::empty_like(B);
    const at::Tensor dh = at::empty_like(h), gated = at::empty_like(h);
    const at::Tensor partial =
        at::empty({dense_backward_splits(T), E * R, D + O}, x.options().dtype(at::kFloat));
    const DenseBackwardArgs args{dy.data_ptr(), x.data_ptr(), A.data_ptr(), B.data_ptr(),
                                 h.data_ptr(), w.data_ptr(), ex.data_ptr<int64_t>(), T, D, O, E,
                                 R, K, scaling, dx.data_ptr(), dw.data_ptr(), dA.data_ptr(),
                                 dB.data_ptr(), dh.data_ptr(), gated.data_ptr(),
                                 partial.data_ptr()};
    C10_CUDA_CHECK(launch_lora_dense_fused_backward(dt, args, current_stream()));
    return {dx, dw, dA, dB};
  }
  // cuBLAS path, everything in the accumulation dtype as in the forward.
  const at::ScalarType acc = acc_type_of(st);
  const ExpandGrads g = expand_backward_generic(dy.to(acc), h.to(acc), B, w, ex, E, R, scaling);
  at::Tensor dx = at::mm(g.dh, A.view({E * R, D}).to(acc)).to(st);
  at::Tensor dA = at::mm(g.dh.t(), x.to(acc)).view({E, R, D}).to(st);
  return {dx, g.dw, dA, g.dB.to(st).contiguous()};
}

at::Tensor lora_dense_expand_cuda(const at::Tensor& h_all_in, const at::Tensor& B_in,
                                  const at::Tensor& w_in, const at::Tensor& experts_in,
                                  double scaling, int64_t num_null_experts) {
  check_lora_dense_expand_args(h_all_in, B_in, w_in, experts_in, scaling, num_null_experts);
  const c10::cuda::CUDAGuard guard(h_all_in.device());
  const at::Tensor h = h_all_in.contiguous(), B = B_in.contiguous(), w = w_in.contiguous(),
                   ex = experts_in.contiguous();
  debug_check_ids(ex, B.size(0) + num_null_experts, "experts");
  const int64_t T = h.size(0), E = B.size(0), O = B.size(1), R = B.size(2), K = ex.size(1);
  const DType dt = dtype_of(h.scalar_type());
  if (dense_expand_supported(dt, T, O, E, R, K) && fused_fits_device(E * R) && aligned16(h) &&
      aligned16(B)) {
    at::Tensor y = at::empty({T, O}, h.options());
    C10_CUDA_CHECK(launch_lora_dense_expand_forward(dt, h.data_ptr(), B.data_ptr(), w.data_ptr(),
                                                    ex.data_ptr<int64_t>(), T, O, E, R, K, scaling,
                                                    y.data_ptr(), current_stream()));
    return y;
  }
  const at::ScalarType acc = acc_type_of(h.scalar_type());
  return expand_generic(h.to(acc), B, w, ex, E, R, scaling).to(h.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_dense_expand_backward_cuda(
    const at::Tensor& grad_y_in, const at::Tensor& h_all_in, const at::Tensor& B_in,
    const at::Tensor& w_in, const at::Tensor& experts_in, double scaling,
    int64_t num_null_experts) {
  check_lora_dense_expand_backward_args(grad_y_in, h_all_in, B_in, w_in, experts_in, scaling,
                                        num_null_experts);
  const c10::cuda::CUDAGuard guard(h_all_in.device());
  const at::ScalarType st = h_all_in.scalar_type();
  const at::Tensor h = h_all_in.contiguous(), B = B_in.contiguous(), w = w_in.contiguous(),
                   ex = experts_in.contiguous(), dy = grad_y_in.to(st).contiguous();
  debug_check_ids(ex, B.size(0) + num_null_experts, "experts");
  const int64_t T = h.size(0), E = B.size(0), O = B.size(1), R = B.size(2), K = ex.size(1);
  const DType dt = dtype_of(st);
  if (dense_expand_supported(dt, T, O, E, R, K) && fused_fits_device(E * R) && aligned16(h) &&
      aligned16(B) && aligned16(dy)) {
    at::Tensor dh = at::empty_like(h), dw = at::empty_like(w), dB = at::empty_like(B);
    const at::Tensor gated = at::empty_like(h);
    const at::Tensor partial =
        at::empty({dense_backward_splits(T), E * R, O}, h.options().dtype(at::kFloat));
    const DenseBackwardArgs args{dy.data_ptr(), nullptr, nullptr, B.data_ptr(), h.data_ptr(),
                                 w.data_ptr(), ex.data_ptr<int64_t>(), T, 0, O, E, R, K, scaling,
                                 nullptr, dw.data_ptr(), nullptr, dB.data_ptr(), dh.data_ptr(),
                                 gated.data_ptr(), partial.data_ptr()};
    C10_CUDA_CHECK(launch_lora_dense_expand_backward(dt, args, current_stream()));
    return {dh, dw, dB};
  }
  const at::ScalarType acc = acc_type_of(st);
  const ExpandGrads g = expand_backward_generic(dy.to(acc), h.to(acc), B, w, ex, E, R, scaling);
  return {g.dh.to(st), g.dw, g.dB.to(st).contiguous()};
}

}  // namespace
}  // namespace cuda
}  // namespace moe_ext

TORCH_LIBRARY_IMPL(moe_ext, CUDA, m) {
  m.impl("lora_dense_forward", &moe_ext::cuda::lora_dense_forward_cuda);
  m.impl("lora_dense_backward", &moe_ext::cuda::lora_dense_backward_cuda);
  m.impl("lora_dense_expand", &moe_ext::cuda::lora_dense_expand_cuda);
  m.impl("lora_dense_expand_backward", &moe_ext::cuda::lora_dense_expand_backward_cuda);
}
