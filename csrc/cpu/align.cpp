// CPU kernel of align: the stable counting sort of the (token, k) pairs by expert id.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "simd.h"

namespace moe_ext {
namespace cpu {
namespace {

// Stable counting sort of the P = T*K pairs by expert id. Each of C chunks counts its ids;
// a chunk's slot for bin b starts after all earlier bins and after earlier chunks' b ids,
// so the result is the same for any C (deterministic and stable).
std::tuple<at::Tensor, at::Tensor> align_cpu(const at::Tensor& experts, int64_t num_bins) {
  check_align_args(experts, num_bins);
  const at::Tensor ids_t = experts.contiguous();
  const int64_t P = ids_t.numel();
  const int64_t* ids = ids_t.data_ptr<int64_t>();
  const int64_t bad = first_bad_expert_id(ids, P, num_bins);
  TORCH_CHECK_VALUE(bad < 0, "experts holds id ", bad < 0 ? 0 : ids[bad], " outside [0, ",
                    num_bins, ")");
  at::Tensor order = at::empty({P}, ids_t.options());
  at::Tensor offsets = at::empty({num_bins + 1}, ids_t.options());
  // C chunks of at least 4096 pairs, at most one per thread, and at most P / num_bins of
  // them: the (chunk, bin) histogram then holds no more entries than max(P, num_bins).
  const int64_t C = std::max<int64_t>(
      1, std::min({int64_t(std::max(1, at::get_num_threads())), P / 4096, P / num_bins}));
  const int64_t chunk = std::max<int64_t>(1, (P + C - 1) / C);
  std::vector<int64_t> hist(C * num_bins, 0);
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* h = hist.data() + c * num_bins;
      for (int64_t i = c * chunk; i < std::min(P, (c + 1) * chunk); ++i) ++h[ids[i]];
    }
  });
  // Exclusive scan in (bin, chunk) order turns counts into each chunk's start per bin.
  int64_t* off = offsets.data_ptr<int64_t>();
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
  int64_t* out = order.data_ptr<int64_t>();
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* h = hist.data() + c * num_bins;
      for (int64_t i = c * chunk; i < std::min(P, (c + 1) * chunk); ++i) out[h[ids[i]]++] = i;
    }
  });
  return {order, offsets};
}

}  // namespace
}  // namespace cpu
}  // namespace moe_ext

TORCH_LIBRARY_IMPL(moe_ext, CPU, m) {
  m.impl("align", &moe_ext::cpu::align_cpu);
}
