// CUDA ops of the dense-gated strategy's mask (gate_dense, gate_dense_backward; kernels in
// gate_dense.cu): checks, allocation and the launches on the current stream.
#include <torch/library.h>

#include "ops_common.h"

namespace moe_ext {
namespace cuda {
namespace {

at::Tensor gate_dense_cuda(const at::Tensor& h_all_in, const at::Tensor& w_in,
                           const at::Tensor& experts_in, int64_t E, int64_t num_null_experts,
                           double scaling) {
  check_gate_dense_args(h_all_in, w_in, experts_in, E, num_null_experts, scaling);
  const c10::cuda::CUDAGuard guard(h_all_in.device());
  const at::Tensor h = h_all_in.contiguous(), w = w_in.contiguous(), ex = experts_in.contiguous();
  debug_check_ids(ex, E + num_null_experts, "experts");
  const int64_t T = h.size(0), R = h.size(1) / E, K = ex.size(1);
  at::Tensor gated = at::empty_like(h);
  C10_CUDA_CHECK(launch_gate_dense(dtype_of(h.scalar_type()), h.data_ptr(), w.data_ptr(),
                                   ex.data_ptr<int64_t>(), T, E, R, K, scaling, gated.data_ptr(),
                                   current_stream()));
  return gated;
}

std::tuple<at::Tensor, at::Tensor> gate_dense_backward_cuda(const at::Tensor& grad_in,
                                                            const at::Tensor& h_all_in,
                                                            const at::Tensor& w_in,
                                                            const at::Tensor& experts_in, int64_t E,
                                                            int64_t num_null_experts,
                                                            double scaling) {
  check_gate_dense_args(h_all_in, w_in, experts_in, E, num_null_experts, scaling, &grad_in);
  const c10::cuda::CUDAGuard guard(h_all_in.device());
  const at::Tensor h = h_all_in.contiguous(), w = w_in.contiguous(), ex = experts_in.contiguous(),
                   g = grad_in.to(h.scalar_type()).contiguous();
  debug_check_ids(ex, E + num_null_experts, "experts");
  const int64_t T = h.size(0), R = h.size(1) / E, K = ex.size(1);
  at::Tensor dh = at::empty_like(h);
  at::Tensor dw = at::empty_like(w);
  C10_CUDA_CHECK(launch_gate_dense_backward(dtype_of(h.scalar_type()), g.data_ptr(), h.data_ptr(),
                                            w.data_ptr(), ex.data_ptr<int64_t>(), T, E, R, K,
                                            scaling, dh.data_ptr(), dw.data_ptr(),
                                            current_stream()));
  return {dh, dw};
}

}  // namespace
}  // namespace cuda
}  // namespace moe_ext

TORCH_LIBRARY_IMPL(moe_ext, CUDA, m) {
  m.impl("gate_dense", &moe_ext::cuda::gate_dense_cuda);
  m.impl("gate_dense_backward", &moe_ext::cuda::gate_dense_backward_cuda);
}
