// The CPU execution model of CUDA, for tests only: csrc/cuda/*.cu compile as C++ with
// MOE_EXT_CPU_MODEL defined (csrc/cuda/cuda_api.cuh includes this header instead of the
// CUDA headers) and run on the host, one host thread per CUDA thread. See
// csrc/cuda/README.md for what it proves and what only a GPU shows.
//
//   runtime.h     error codes, dim3, streams, cudaMemsetAsync, launch limits
//   fp16.h        __half, __nv_bfloat16
//   block.h       a thread block: __syncthreads barrier, warp collectives, misuse checks
//   executor.h    launches: worker threads, blocks in turn, shared memory, watchdog
//   intrinsics.h  __syncthreads, warp intrinsics, atomics, bit operations, math
//   ptx_model.h   mma.sync m16n8k16, ldmatrix, cp.async (behind csrc/cuda/ptx.cuh)
//   launch.h      the kernel launch (csrc/cuda/cuda_api.cuh: launch_kernel)
//
// Link every program that uses it with -Wl,-T,shared_memory.ld (how the model finds the
// static __shared__ variables to poison them).
#pragma once

// Qualifiers: device code is host code here.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// A __shared__ variable is a function-local static: one copy, which is right because the
// model runs one block at a time; the executor poisons it at the start of every block.
#define __shared__ static

#include "runtime.h"
#include "fp16.h"
#include "sanitizer.h"
#include "block.h"
#include "executor.h"
#include "intrinsics.h"
#include "ptx_model.h"
#include "launch.h"
