// The counting sort behind the align op, for the CPU kernels that align pairs themselves
// (lora_forward's pair alignment), without going through the dispatcher.
#pragma once
#include <tuple>

#include "../stable.h"

namespace moe_ext {
namespace cpu {

// Stable counting sort of ids[0:P) (each in [0, num_bins), checked by the caller):
// order (P,) int64 and offsets (num_bins + 1,) int64 on `device` (the CPU).
std::tuple<Tensor, Tensor> align_sorted(const int64_t* ids, int64_t P, int64_t num_bins,
                                        const Device& device);

}  // namespace cpu
}  // namespace moe_ext
