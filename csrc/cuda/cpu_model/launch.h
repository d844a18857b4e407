// A kernel launch in the CPU execution model: the configuration checks a GPU makes (a
// launch that would fail there fails here, with the same error), then the grid on the
// executor. Errors are read with cudaGetLastError(), as after <<<...>>>.
#pragma once
#include <cstdio>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "executor.h"
#include "runtime.h"

namespace moe_ext {
namespace cpu_model {

// "moe_ext::cuda::{anonymous}::route_kernel<float>" for launch<route_kernel<float>>.
template <auto Kernel>
const std::string& kernel_name() {
  static const std::string name = [] {
    const std::string f = __PRETTY_FUNCTION__;
    const size_t at = f.find("Kernel = ");
    if (at == std::string::npos) return f;
    const size_t begin = at + 9, end = f.find_first_of(";]", begin);
    return f.substr(begin, end - begin);
  }();
  return name;
}

template <typename F>
struct KernelParams;
template <typename... P>
struct KernelParams<void (*)(P...)> {
  using tuple = std::tuple<std::decay_t<P>...>;
};

// Why a launch with this configuration fails on a GPU ("" when it does not).
inline std::string launch_config_error(dim3 grid, dim3 block, size_t smem, size_t smem_limit) {
  using L = DeviceLimits;
  const unsigned g[3] = {grid.x, grid.y, grid.z}, b[3] = {block.x, block.y, block.z};
  for (int i = 0; i < 3; ++i) {
    if (g[i] == 0 || g[i] > L::kMaxGridDim[i])
      return "grid dimension " + std::to_string(i) + " is " + std::to_string(g[i]) +
             " (must be in [1, " + std::to_string(L::kMaxGridDim[i]) + "])";
    if (b[i] == 0 || b[i] > L::kMaxBlockDim[i])
      return "block dimension " + std::to_string(i) + " is " + std::to_string(b[i]) +
             " (must be in [1, " + std::to_string(L::kMaxBlockDim[i]) + "])";
  }
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (threads > L::kMaxThreadsPerBlock)
    return std::to_string(threads) + " threads per block (at most " +
           std::to_string(L::kMaxThreadsPerBlock) + ")";
  if (smem > smem_limit)
    return std::to_string(smem) + " bytes of dynamic shared memory (at most " +
           std::to_string(smem_limit) +
           (smem_limit < L::kMaxSharedPerBlockOptin
                ? " without cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize)"
                : "") +
           ")";
  return "";
}

template <auto Kernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, Args&&... args) {
  static_assert(std::is_pointer<decltype(Kernel)>::value, "launch<kernel>: a kernel function");
  const std::string& name = kernel_name<Kernel>();
  if (this_thread.block != nullptr) {
    current_block().fault("kernel " + name + " launched from device code (not modelled)");
  }
  if (sticky_error() != cudaSuccess) return;  // a faulted context runs nothing
  size_t limit = DeviceLimits::kDefaultSharedPerBlock;
  const auto attr = max_dynamic_shared().find(reinterpret_cast<const void*>(Kernel));
  if (attr != max_dynamic_shared().end()) limit = attr->second;
  const std::string bad = launch_config_error(grid, block, smem, limit);
  if (!bad.empty()) {
    const cudaError_t err = smem > limit ? cudaErrorInvalidValue : cudaErrorInvalidConfiguration;
    set_error(err, "launch of " + name + ": " + bad, /*sticky=*/false);
    return;
  }
  using Params = typename KernelParams<decltype(Kernel)>::tuple;
  const Params params(std::forward<Args>(args)...);
  const std::function<void()> body = [&params] { std::apply(Kernel, params); };
  if (!Executor::instance().run(name, grid, block, smem, body) && !errors().quiet)
    std::fprintf(stderr, "[cuda-cpu-model] %s\n", last_error_message().c_str());
}

}  // namespace cpu_model
}  // namespace moe_ext
