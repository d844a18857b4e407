// Device intrinsics of the CPU execution model: __syncthreads, the warp intrinsics
// (meeting points of the lanes named in their masks, see block.h), atomics, bit
// operations and the math functions the kernels use. Each synchronising intrinsic takes
// the caller's source location as a hidden default argument, for diagnostics.
#pragma once
#include <math.h>
#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "block.h"
#include "executor.h"
#include "sanitizer.h"

namespace moe_ext {
namespace cpu_model {

inline int lane_id() { return this_thread.tid % 32; }

template <typename T>
inline LaneData lane_data(const T& value, int arg = 0, int width = 32) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= sizeof(LaneData::bytes),
                "warp intrinsic value type");
  LaneData d{};
  std::memcpy(d.bytes, &value, sizeof(T));
  d.arg = arg;
  d.width = width;
  return d;
}

template <typename T>
inline T value_of(const LaneData& d) {
  T v;
  std::memcpy(&v, d.bytes, sizeof(T));
  return v;
}

// An undefined value (what a lane outside the mask would give): all bits set.
template <typename T>
inline T undefined_value() {
  T v;
  std::memset(&v, 0xff, sizeof(T));
  return v;
}

// Runs one collective of the calling lane and returns f(collective), the lane's result.
// The exchange is invisible to TSan unless `orders_memory` (__syncwarp).
template <typename F>
inline auto warp_collective(WarpOp op, int qualifier, unsigned mask, const LaneData& mine,
                            Site site, bool orders_memory, F&& f) {
  Block& b = current_block();
  tsan::IgnoreAll hidden(!orders_memory);
  std::shared_ptr<const Collective> c =
      b.collective(this_thread.tid, op, qualifier, mask, mine, site);
  return f(*c);
}

[[noreturn]] inline void thread_fault(const std::string& what) {
  Block& b = current_block();
  b.fault(b.thread_name(this_thread.tid) + ": " + what);
}

// The lane a shuffle reads for `lane` (its own when the source is outside its segment).
inline int shuffle_source(WarpOp op, int lane, int arg, int width) {
  const int seg = lane & ~(width - 1);
  switch (op) {
    case WarpOp::kShflIdx: return seg + (arg & (width - 1));
    case WarpOp::kShflUp: return (lane - seg) >= arg ? lane - arg : lane;
    case WarpOp::kShflDown: return (lane - seg) + arg < width ? lane + arg : lane;
    default: {  // xor: lanes of later segments give the caller's own value
      const int src = lane ^ arg;
      return (src >= seg + width || src > 31) ? lane : src;
    }
  }
}

template <typename T>
inline T shuffle(WarpOp op, unsigned mask, T var, int arg, int width, Site site) {
  if (width < 1 || width > 32 || (width & (width - 1)))
    thread_fault(std::string(op_name(op)) + " at " + site.str() + " with width " +
                 std::to_string(width) + ", not a power of two in [1, 32]");
  const int lane = lane_id();
  return warp_collective(op, 0, mask, lane_data(var, arg, width), site, false,
                         [&](const Collective& c) {
                           const int src = shuffle_source(op, lane, arg, width);
                           return (c.mask >> src & 1) ? value_of<T>(c.lane[src])
                                                      : undefined_value<T>();
                         });
}

inline unsigned vote(WarpOp op, unsigned mask, bool pred, Site site) {
  return warp_collective(op, 0, mask, lane_data(pred ? 1 : 0), site, false,
                         [&](const Collective& c) {
                           unsigned ballot = 0;
                           for (int l = 0; l < 32; ++l)
                             if ((c.mask >> l & 1) && value_of<int>(c.lane[l])) ballot |= 1u << l;
                           return ballot;
                         });
}

// Bits of the lanes of `c` whose value equals that of `lane` (compared bytewise).
template <typename T>
inline unsigned equal_lanes(const Collective& c, int lane) {
  unsigned peers = 0;
  for (int l = 0; l < 32; ++l)
    if ((c.mask >> l & 1) && std::memcmp(c.lane[l].bytes, c.lane[lane].bytes, sizeof(T)) == 0)
      peers |= 1u << l;
  return peers;
}

enum class Reduce { kAdd, kMin, kMax, kAnd, kOr, kXor };

template <typename T>
inline T reduce(Reduce kind, unsigned mask, T value, Site site) {
  return warp_collective(WarpOp::kReduce, static_cast<int>(kind), mask, lane_data(value), site,
                         false, [&](const Collective& c) {
                           bool first = true;
                           T r{};
                           for (int l = 0; l < 32; ++l) {
                             if (!(c.mask >> l & 1)) continue;
                             const T v = value_of<T>(c.lane[l]);
                             if (first) r = v;
                             else if (kind == Reduce::kAdd) r = static_cast<T>(r + v);
                             else if (kind == Reduce::kMin) r = std::min(r, v);
                             else if (kind == Reduce::kMax) r = std::max(r, v);
                             else if (kind == Reduce::kAnd) r = r & v;
                             else if (kind == Reduce::kOr) r = r | v;
                             else r = r ^ v;
                             first = false;
                           }
                           return r;
                         });
}

// Atomics: relaxed, as CUDA's atomicXxx (no ordering of other accesses).
template <typename T>
inline T atomic_update(T* addr, T (*f)(T, T), T v) {
  T old = __atomic_load_n(addr, __ATOMIC_RELAXED);
  while (!__atomic_compare_exchange_n(addr, &old, f(old, v), true, __ATOMIC_RELAXED,
                                      __ATOMIC_RELAXED)) {
  }
  return old;
}

template <typename F, typename Bits>
inline F atomic_add_float(F* addr, F v) {
  static_assert(sizeof(F) == sizeof(Bits), "bit type");
  Bits* bits = reinterpret_cast<Bits*>(addr);
  Bits old = __atomic_load_n(bits, __ATOMIC_RELAXED);
  for (;;) {
    F f;
    std::memcpy(&f, &old, sizeof f);
    const F sum = static_cast<F>(static_cast<float>(f) + static_cast<float>(v));
    Bits next;
    std::memcpy(&next, &sum, sizeof next);
    if (__atomic_compare_exchange_n(bits, &old, next, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
      return f;
  }
}

}  // namespace cpu_model
}  // namespace moe_ext

#define MOE_CPU_MODEL_SITE moe_ext::cpu_model::Site site = moe_ext::cpu_model::Site::here()

// ---- barriers
inline void __syncthreads(MOE_CPU_MODEL_SITE) {
  using namespace moe_ext::cpu_model;
  current_block().barrier(this_thread.tid, site, false);
}
inline int __syncthreads_count(int pred, MOE_CPU_MODEL_SITE) {
  using namespace moe_ext::cpu_model;
  return current_block().barrier(this_thread.tid, site, pred != 0).count;
}
inline int __syncthreads_and(int pred, MOE_CPU_MODEL_SITE) {
  using namespace moe_ext::cpu_model;
  const auto r = current_block().barrier(this_thread.tid, site, pred != 0);
  return r.count == r.participants;
}
inline int __syncthreads_or(int pred, MOE_CPU_MODEL_SITE) {
  using namespace moe_ext::cpu_model;
  return current_block().barrier(this_thread.tid, site, pred != 0).count > 0;
}

// ---- warp intrinsics
inline void __syncwarp(unsigned mask = 0xffffffffu, MOE_CPU_MODEL_SITE) {
  using namespace moe_ext::cpu_model;
  warp_collective(WarpOp::kSyncwarp, 0, mask, LaneData{}, site, true,
                  [](const Collective&) { return 0; });
}
template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32, MOE_CPU_MODEL_SITE) {
  return moe_ext::cpu_model::shuffle(moe_ext::cpu_model::WarpOp::kShflIdx, mask, var, src_lane,
                                     width, site);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32, MOE_CPU_MODEL_SITE) {
  return moe_ext::cpu_model::shuffle(moe_ext::cpu_model::WarpOp::kShflUp, mask, var,
                                     static_cast<int>(delta), width, site);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32,
                          MOE_CPU_MODEL_SITE) {
  return moe_ext::cpu_model::shuffle(moe_ext::cpu_model::WarpOp::kShflDown, mask, var,
                                     static_cast<int>(delta), width, site);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32, MOE_CPU_MODEL_SITE) {
  return moe_ext::cpu_model::shuffle(moe_ext::cpu_model::WarpOp::kShflXor, mask, var, lane_mask,
                                     width, site);
}
inline unsigned __ballot_sync(unsigned mask, int pred, MOE_CPU_MODEL_SITE) {
  return moe_ext::cpu_model::vote(moe_ext::cpu_model::WarpOp::kBallot, mask, pred != 0, site);
}
inline int __any_sync(unsigned mask, int pred, MOE_CPU_MODEL_SITE) {
  return moe_ext::cpu_model::vote(moe_ext::cpu_model::WarpOp::kAny, mask, pred != 0, site) != 0;
}
inline int __all_sync(unsigned mask, int pred, MOE_CPU_MODEL_SITE) {
  return moe_ext::cpu_model::vote(moe_ext::cpu_model::WarpOp::kAll, mask, pred != 0, site) == mask;
}
template <typename T>
inline unsigned __match_any_sync(unsigned mask, T value, MOE_CPU_MODEL_SITE) {
  using namespace moe_ext::cpu_model;
  const int lane = lane_id();
  return warp_collective(WarpOp::kMatchAny, 0, mask, lane_data(value), site, false,
                         [&](const Collective& c) { return equal_lanes<T>(c, lane); });
}
template <typename T>
inline unsigned __match_all_sync(unsigned mask, T value, int* pred, MOE_CPU_MODEL_SITE) {
  using namespace moe_ext::cpu_model;
  const int lane = lane_id();
  const unsigned peers =
      warp_collective(WarpOp::kMatchAll, 0, mask, lane_data(value), site, false,
                      [&](const Collective& c) { return equal_lanes<T>(c, lane); });
  *pred = peers == mask;
  return peers == mask ? mask : 0u;
}
#define MOE_CPU_MODEL_REDUCE(name, kind, T)                                  \
  inline T name(unsigned mask, T v, MOE_CPU_MODEL_SITE) {                      \
    return moe_ext::cpu_model::reduce(moe_ext::cpu_model::Reduce::kind, mask, v, site); \
  }
MOE_CPU_MODEL_REDUCE(__reduce_add_sync, kAdd, unsigned)
MOE_CPU_MODEL_REDUCE(__reduce_add_sync, kAdd, int)
MOE_CPU_MODEL_REDUCE(__reduce_min_sync, kMin, unsigned)
MOE_CPU_MODEL_REDUCE(__reduce_min_sync, kMin, int)
MOE_CPU_MODEL_REDUCE(__reduce_max_sync, kMax, unsigned)
MOE_CPU_MODEL_REDUCE(__reduce_max_sync, kMax, int)
MOE_CPU_MODEL_REDUCE(__reduce_and_sync, kAnd, unsigned)
MOE_CPU_MODEL_REDUCE(__reduce_or_sync, kOr, unsigned)
MOE_CPU_MODEL_REDUCE(__reduce_xor_sync, kXor, unsigned)
#undef MOE_CPU_MODEL_REDUCE

// Not modelled: on a GPU it gives the lanes that happen to be converged with the caller,
// which depends on scheduling (the model has no convergence to mirror), and code that
// feeds it to a *_sync intrinsic is racy. Use an explicit mask or __ballot_sync.
inline unsigned __activemask(MOE_CPU_MODEL_SITE) {
  moe_ext::cpu_model::thread_fault("__activemask at " + site.str() +
                                   " is not modelled (its result depends on scheduling); use "
                                   "an explicit mask or __ballot_sync");
}

// ---- atomics
template <typename T>
inline T moe_cpu_model_add(T a, T b) { return a + b; }
template <typename T>
inline T moe_cpu_model_min(T a, T b) { return b < a ? b : a; }
template <typename T>
inline T moe_cpu_model_max(T a, T b) { return a < b ? b : a; }

inline int atomicAdd(int* a, int v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }
inline unsigned atomicAdd(unsigned* a, unsigned v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
  return __atomic_fetch_add(a, v, __ATOMIC_RELAXED);
}
inline float atomicAdd(float* a, float v) {
  return moe_ext::cpu_model::atomic_add_float<float, uint32_t>(a, v);
}
inline double atomicAdd(double* a, double v) {
  uint64_t* bits = reinterpret_cast<uint64_t*>(a);
  uint64_t old = __atomic_load_n(bits, __ATOMIC_RELAXED);
  for (;;) {
    double d, sum;
    std::memcpy(&d, &old, 8);
    sum = d + v;
    uint64_t next;
    std::memcpy(&next, &sum, 8);
    if (__atomic_compare_exchange_n(bits, &old, next, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
      return d;
  }
}
inline int atomicSub(int* a, int v) { return __atomic_fetch_sub(a, v, __ATOMIC_RELAXED); }
inline unsigned atomicSub(unsigned* a, unsigned v) { return __atomic_fetch_sub(a, v, __ATOMIC_RELAXED); }
inline int atomicExch(int* a, int v) { return __atomic_exchange_n(a, v, __ATOMIC_RELAXED); }
inline unsigned atomicExch(unsigned* a, unsigned v) { return __atomic_exchange_n(a, v, __ATOMIC_RELAXED); }
inline unsigned long long atomicExch(unsigned long long* a, unsigned long long v) {
  return __atomic_exchange_n(a, v, __ATOMIC_RELAXED);
}
inline int atomicCAS(int* a, int expected, int desired) {
  __atomic_compare_exchange_n(a, &expected, desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return expected;
}
inline unsigned atomicCAS(unsigned* a, unsigned expected, unsigned desired) {
  __atomic_compare_exchange_n(a, &expected, desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return expected;
}
inline unsigned long long atomicCAS(unsigned long long* a, unsigned long long expected,
                                    unsigned long long desired) {
  __atomic_compare_exchange_n(a, &expected, desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return expected;
}
inline int atomicMax(int* a, int v) { return moe_ext::cpu_model::atomic_update(a, moe_cpu_model_max<int>, v); }
inline int atomicMin(int* a, int v) { return moe_ext::cpu_model::atomic_update(a, moe_cpu_model_min<int>, v); }
inline unsigned atomicMax(unsigned* a, unsigned v) {
  return moe_ext::cpu_model::atomic_update(a, moe_cpu_model_max<unsigned>, v);
}
inline unsigned atomicMin(unsigned* a, unsigned v) {
  return moe_ext::cpu_model::atomic_update(a, moe_cpu_model_min<unsigned>, v);
}
inline unsigned long long atomicMax(unsigned long long* a, unsigned long long v) {
  return moe_ext::cpu_model::atomic_update(a, moe_cpu_model_max<unsigned long long>, v);
}
inline int atomicOr(int* a, int v) { return __atomic_fetch_or(a, v, __ATOMIC_RELAXED); }
inline unsigned atomicOr(unsigned* a, unsigned v) { return __atomic_fetch_or(a, v, __ATOMIC_RELAXED); }
inline int atomicAnd(int* a, int v) { return __atomic_fetch_and(a, v, __ATOMIC_RELAXED); }
inline unsigned atomicAnd(unsigned* a, unsigned v) { return __atomic_fetch_and(a, v, __ATOMIC_RELAXED); }
// Fences order this thread's accesses for the others. TSan does not model fences: code
// that needs one between relaxed atomics shows up as a race here.
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __nanosleep(unsigned) { sched_yield(); }
inline long long clock64() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch()).count();
}
template <typename T>
inline T __ldg(const T* p) { return *p; }

// ---- bit operations
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __ffsll(long long v) { return __builtin_ffsll(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
inline int __clzll(long long v) { return v == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(v)); }
inline unsigned __brev(unsigned v) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((v >> i) & 1u) << (31 - i);
  return r;
}

// ---- math (device overloads of min/max as CUDA's math headers have them)
inline int max(int a, int b) { return a < b ? b : a; }
inline unsigned max(unsigned a, unsigned b) { return a < b ? b : a; }
inline long max(long a, long b) { return a < b ? b : a; }
inline long long max(long long a, long long b) { return a < b ? b : a; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a < b ? b : a; }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline int min(int a, int b) { return b < a ? b : a; }
inline unsigned min(unsigned a, unsigned b) { return b < a ? b : a; }
inline long min(long a, long b) { return b < a ? b : a; }
inline long long min(long long a, long long b) { return b < a ? b : a; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return b < a ? b : a; }
inline float min(float a, float b) { return fminf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline float __expf(float v) { return expf(v); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float v) { return 1.0f / sqrtf(v); }
