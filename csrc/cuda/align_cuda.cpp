// CUDA op of align: checks, allocation on the current stream and the launches of align.cu.
// No host synchronisation unless MOE_EXT_DEBUG=1. The sparse LoRA ops (lora_cuda.cpp) call
// align_unchecked_ids, which counts ids outside [0, num_bins) in the last bin.
#include "ops_common.h"

namespace moe_ext {
namespace cuda {

std::tuple<Tensor, Tensor> align_cuda(const Tensor& experts, int64_t num_bins) {
  check_align_args(experts, num_bins);
  const auto guard = device_guard(experts);
  debug_check_ids(experts, num_bins, "experts");
  return align_unchecked_ids(experts, num_bins);
}

std::tuple<Tensor, Tensor> align_unchecked_ids(const Tensor& experts, int64_t num_bins) {
  const Tensor ids = aten::contiguous(experts);
  const int64_t P = ids.numel();
  check_int32_range(P, "the number of (token, k) pairs");
  check_int32_range(num_bins, "num_bins");
  // The (bin, chunk of 256 pairs) count table must stay reasonable (num_bins is capped by
  // check_align_args, P by the int32 range, so the product does not overflow).
  MOE_CHECK_VALUE(align_scratch_ints(P, num_bins) <= (int64_t(1) << 30),
                  "align on CUDA needs a count table of num_bins * ceil(P / 256) = ",
                  align_scratch_ints(P, num_bins), " int32 entries for num_bins=", num_bins,
                  " and P=", P, " pairs; at most 2^30 are allowed");
  const Device device = ids.device();
  Tensor order = aten::empty({P}, kLong, device);
  Tensor offsets = aten::empty({num_bins + 1}, kLong, device);
  Tensor scratch = aten::empty({align_scratch_ints(P, num_bins)}, kInt, device);
  MOE_CUDA_CHECK(launch_align(
      ids.const_data_ptr<int64_t>(), P, num_bins, scratch.mutable_data_ptr<int32_t>(),
      order.mutable_data_ptr<int64_t>(), offsets.mutable_data_ptr<int64_t>(), current_stream()));
  return {order, offsets};
}

}  // namespace cuda
}  // namespace moe_ext

STABLE_TORCH_LIBRARY_IMPL(moe_ext, CUDA, m) {
  m.impl("align", TORCH_BOX(&moe_ext::cuda::align_cuda));
}
