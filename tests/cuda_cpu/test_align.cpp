// align (csrc/cuda/align.cu) on the CPU execution model against the float64 reference
// (a stable counting sort): the cases of tests/ops/test_align.py, at small sizes.
#include <random>
#include <string>

#include "harness.h"
#include "ops.h"
#include "reference.h"

namespace cuda_cpu {
namespace {

void expect_aligned(const std::vector<int64_t>& ids, int64_t bins) {
  const int64_t P = static_cast<int64_t>(ids.size());
  const AlignOut got = align(ints_to_device(ids), P, bins);
  std::vector<int64_t> order, offsets;
  ref::align(ids, bins, order, offsets);
  expect_equal("offsets", ints_to_host(got.offsets, bins + 1), offsets);
  expect_equal("order", ints_to_host(got.order, P), order);
}

std::vector<int64_t> random_ids(int64_t n, int64_t bins, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::uniform_int_distribution<int64_t> id(0, bins - 1);
  std::vector<int64_t> v(n);
  for (auto& x : v) x = id(gen);
  return v;
}

struct Shape {
  int64_t T, K, bins;
  const char* tags;
};
// (4500, 2, 4): 36 chunks of 256 pairs (> 32: the chunk scan loops); (20, 2, 1030): > 1024
// bins (the bin scan loops); (1, 1, 1) and (777, 4, 1): one bin.
const Shape kShapes[] = {{1, 1, 1, ""},      {10, 2, 4, ""},      {333, 3, 17, "tsan"},
                         {4500, 2, 4, ""},   {20, 2, 1030, ""},   {777, 4, 1, ""}};

const bool kRegistered = [] {
  for (const Shape& s : kShapes)
    Register("align/parity T" + std::to_string(s.T) + " K" + std::to_string(s.K) + " bins" +
                 std::to_string(s.bins),
             s.tags, [s] { expect_aligned(random_ids(s.T * s.K, s.bins, s.T), s.bins); });
  return true;
}();

CUDA_CPU_CASE("align/all pairs on one expert, empty bins", "", [] {
  const AlignOut got = align(ints_to_device(std::vector<int64_t>(100, 3)), 100, 6);
  expect_equal("offsets", ints_to_host(got.offsets, 7), std::vector<int64_t>{0, 0, 0, 0, 100, 100, 100});
  std::vector<int64_t> iota(100);
  for (int i = 0; i < 100; ++i) iota[i] = i;
  expect_equal("order", ints_to_host(got.order, 100), iota);
});

CUDA_CPU_CASE("align/bad ids go to the last bin", "", [] {
  auto ids = random_ids(300, 5, 9);
  ids[7] = -1;
  ids[100] = 5;
  ids[299] = 1 << 20;
  expect_aligned(ids, 5);
});

CUDA_CPU_CASE("align/P=0", "", [] {
  const AlignOut got = align(Buffer(), 0, 4);
  expect_equal("offsets", ints_to_host(got.offsets, 5), std::vector<int64_t>(5, 0));
});

}  // namespace
}  // namespace cuda_cpu
