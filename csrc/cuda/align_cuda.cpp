// CUDA op of align: checks, allocation on the current stream and the launches of align.cu.
// No host synchronisation unless MOE_EXT_DEBUG=1. align_cuda is also called by the sparse
// LoRA forward (lora_cuda.cpp).
#include <torch/library.h>

#include "ops_common.h"

namespace moe_ext {
namespace cuda {

std::tuple<at::Tensor, at::Tensor> align_cuda(const at::Tensor& experts, int64_t num_bins) {
  check_align_args(experts, num_bins);
  const c10::cuda::CUDAGuard guard(experts.device());
  const at::Tensor ids = experts.contiguous();
  const int64_t P = ids.numel();
  check_int32_range(P, "the number of (token, k) pairs");
  check_int32_range(num_bins, "num_bins");
  debug_check_ids(ids, num_bins, "experts");
  at::Tensor order = at::empty({P}, ids.options());
  at::Tensor offsets = at::empty({num_bins + 1}, ids.options());
  at::Tensor scratch = at::empty({align_scratch_ints(P, num_bins)}, ids.options().dtype(at::kInt));
  C10_CUDA_CHECK(launch_align(ids.data_ptr<int64_t>(), P, num_bins, scratch.data_ptr<int32_t>(),
                              order.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
                              current_stream()));
  return {order, offsets};
}

}  // namespace cuda
}  // namespace moe_ext

TORCH_LIBRARY_IMPL(moe_ext, CUDA, m) {
  m.impl("align", &moe_ext::cuda::align_cuda);
}
