// CPU kernel of align: the stable counting sort of the (token, k) pairs by expert id.
#include <algorithm>
#include <vector>

#include "align.h"

#include "../checks.h"
#include "simd.h"

namespace moe_ext {
namespace cpu {

// Stable counting sort of the P = T*K pairs by expert id. Each of C chunks counts its ids;
// a chunk's slot for bin b starts after all earlier bins and after earlier chunks' b ids,
// so the result is the same for any C (deterministic and stable).
std::tuple<Tensor, Tensor> align_sorted(const int64_t* ids, int64_t P, int64_t num_bins,
                                        const Device& device) {
  Tensor order = aten::empty({P}, kLong, device);
  Tensor offsets = aten::empty({num_bins + 1}, kLong, device);
  // C chunks of at least 4096 pairs, at most one per thread, and at most P / num_bins of
  // them: the (chunk, bin) histogram then holds no more entries than max(P, num_bins).
  const int64_t C = std::max<int64_t>(
      1, std::min({int64_t(std::max<uint32_t>(1, torch::stable::get_num_threads())), P / 4096,
                   P / num_bins}));
  const int64_t chunk = std::max<int64_t>(1, (P + C - 1) / C);
  std::vector<int64_t> hist(C * num_bins, 0);
  torch::stable::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* h = hist.data() + c * num_bins;
      for (int64_t i = c * chunk; i < std::min(P, (c + 1) * chunk); ++i) ++h[ids[i]];
    }
  });
  // Exclusive scan in (bin, chunk) order turns counts into each chunk's start per bin.
  int64_t* off = offsets.mutable_data_ptr<int64_t>();
  int64_t running = 0;
  for (int64_t b = 0; b < num_bins; ++b) {
    off[b] = running;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t n = hist[c * num_bins + b];
      hist[c * num_bins + b] = running;
      running += n;
    }
  }
  off[num_bins] = running;
  int64_t* out = order.mutable_data_ptr<int64_t>();
  torch::stable::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* h = hist.data() + c * num_bins;
      for (int64_t i = c * chunk; i < std::min(P, (c + 1) * chunk); ++i) out[h[ids[i]]++] = i;
    }
  });
  return {order, offsets};
}

namespace {

std::tuple<Tensor, Tensor> align_cpu(const Tensor& experts, int64_t num_bins) {
  check_align_args(experts, num_bins);
  const Tensor ids_t = aten::contiguous(experts);
  const int64_t P = ids_t.numel();
  const int64_t* ids = ids_t.const_data_ptr<int64_t>();
  const int64_t bad = first_bad_expert_id(ids, P, num_bins);
  MOE_CHECK_VALUE(bad < 0, "experts holds id ", bad < 0 ? 0 : ids[bad], " outside [0, ",
                  num_bins, ")");
  return align_sorted(ids, P, num_bins, ids_t.device());
}

}  // namespace
}  // namespace cpu
}  // namespace moe_ext

STABLE_TORCH_LIBRARY_IMPL(moe_ext, CPU, m) {
  m.impl("align", TORCH_BOX(&moe_ext::cpu::align_cpu));
}
