// The one switch between the two builds of csrc/cuda/*.cu: with nvcc (the extension) the
// CUDA headers; with MOE_EXT_CPU_MODEL (tests only, as C++) the CPU execution model in
// cpu_model/, which runs the same kernels on the host (see README.md here). Kernels are
// launched only through launch_kernel, and inline PTX lives only in ptx.cuh, so that the
// model can stand in for both.
#pragma once
#include <cstddef>
#include <utility>

#if defined(MOE_EXT_CPU_MODEL)
#include "cpu_model/cuda_model.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

namespace moe_ext {
namespace cuda {

// Kernel<<<grid, block, smem_bytes, stream>>>(args...): the arguments convert to the
// kernel's parameter types as with <<<>>>; errors are read with cudaGetLastError().
// Usage: launch_kernel<my_kernel<float>>(grid, threads, 0, stream, x, n);
template <auto Kernel, typename... Args>
inline void launch_kernel(dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                          Args&&... args) {
#if defined(MOE_EXT_CPU_MODEL)
  ::moe_ext::cpu_model::launch<Kernel>(grid, block, smem_bytes, stream, std::forward<Args>(args)...);
#else
  Kernel<<<grid, block, smem_bytes, stream>>>(std::forward<Args>(args)...);
#endif
}

// The block's dynamic shared memory (the launch's smem_bytes; 16-byte aligned). Above
// 48 KiB the kernel needs cudaFuncSetAttribute(kernel,
// cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) first, in both builds.
template <typename T>
__device__ __forceinline__ T* dynamic_shared_memory() {
#if defined(MOE_EXT_CPU_MODEL)
  return static_cast<T*>(::moe_ext::cpu_model::dynamic_shared_memory());
#else
  extern __shared__ __align__(16) unsigned char moe_ext_dynamic_smem[];
  return reinterpret_cast<T*>(moe_ext_dynamic_smem);
#endif
}

}  // namespace cuda
}  // namespace moe_ext
