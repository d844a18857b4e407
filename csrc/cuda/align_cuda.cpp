// CUDA op of align: checks, allocation on the current stream and the launches of align.cu.
// No host synchronisation unless MOE_EXT_DEBUG=1. The sparse LoRA ops (lora_cuda.cpp) call
// align_unchecked_ids, which counts ids outside [0, num_bins) in the last bin.
#include <torch/library.h>

#include "ops_common.h"

namespace moe_ext {
namespace cuda {

std::tuple<at::Tensor, at::Tensor> align_cuda(const at::Tensor& experts, int64_t num_bins) {
  check_align_args(experts, num_bins);
  const c10::cuda::CUDAGuard guard(experts.device());
  debug_check_ids(experts, num_bins, "experts");
  return align_unchecked_ids(experts, num_bins);
}

std::tuple<at::Tensor, at::Tensor> align_unchecked_ids(const at::Tensor& experts,
                                                       int64_t num_bins) {
  const at::Tensor ids = experts.contiguous();
  const int64_t P = ids.numel();
  check_int32_range(P, "the number of (token, k) pairs");
  check_int32_range(num_bins, "num_bins");
  // The (bin, chunk of 256 pairs) count table must stay reasonable (num_bins is capped by
  // check_align_args, P by the int32 range, so the product does not overflow).
  TORCH_CHECK_VALUE(align_scratch_ints(P, num_bins) <= (int64_t(1) << 30),
                    "align on CUDA needs a count table of num_bins * ceil(P / 256) = ",
                    align_scratch_ints(P, num_bins), " int32 entries for num_bins=", num_bins,
                    " and P=", P, " pairs; at most 2^30 are allowed");
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
