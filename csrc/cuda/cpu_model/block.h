// One thread block of the CPU execution model: its CUDA threads (host threads, see
// executor.h) meet at __syncthreads (a barrier that exited threads leave) and at warp
// collectives (32-lane meeting points that honour their masks). Misuse that a GPU would
// turn into a hang or undefined values is reported as a fault of the launch:
//   - a deadlock (every live thread of the block waits and none can go on),
//   - threads meeting at __syncthreads at different places in the code,
//   - a warp collective whose mask names a lane that has exited (or does not exist), or
//     that leaves out the executing lane, or lanes meeting with one mask at different
//     intrinsics.
// A fault wakes every waiting thread of the block with a KernelFault exception, which
// unwinds the kernel; the launch then reports cudaErrorLaunchFailure.
#pragma once
#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "runtime.h"
#include "sanitizer.h"

namespace moe_ext {
namespace cpu_model {

// A place in the source (of a __syncthreads, a warp intrinsic...), for diagnostics.
struct Site {
  const char* file;
  int line;
  static Site here(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return {file, line};
  }
  bool operator==(const Site& o) const { return line == o.line && std::strcmp(file, o.file) == 0; }
  std::string str() const {
    const char* slash = std::strrchr(file, '/');
    return std::string(slash ? slash + 1 : file) + ":" + std::to_string(line);
  }
};

// Thrown in the CUDA threads of a block that faulted, to unwind their kernels.
struct KernelFault {};

// Waiting: 32 lanes meet at every warp intrinsic, so a wait-and-wake costs a context
// switch per lane; futexes wake exactly the waiters, which then run without taking a
// lock (2-3x faster than condition variables here). Sleeps while word == old (spurious
// returns allowed; `timeout` null: no limit).
inline void futex_wait(std::atomic<int>& word, int old, const timespec* timeout = nullptr) {
  syscall(SYS_futex, reinterpret_cast<int*>(&word), FUTEX_WAIT_PRIVATE, old, timeout, nullptr, 0);
}
inline void futex_wake_all(std::atomic<int>& word) {
  syscall(SYS_futex, reinterpret_cast<int*>(&word), FUTEX_WAKE_PRIVATE, 1 << 30, nullptr, nullptr, 0);
}
// Waits until `word` differs from `old`; returns its new value (acquire).
inline int wait_for_change(std::atomic<int>& word, int old) {
  int now;
  while ((now = word.load(std::memory_order_acquire)) == old) futex_wait(word, old);
  return now;
}
static_assert(sizeof(std::atomic<int>) == sizeof(int), "futex word");

// The warp collectives; lanes meet only with lanes at the same kind and qualifier.
enum class WarpOp {
  kSyncwarp, kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kMatchAny, kMatchAll,
  kReduce, kMma, kLdmatrix
};

inline const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kSyncwarp: return "__syncwarp";
    case WarpOp::kShflIdx: return "__shfl_sync";
    case WarpOp::kShflUp: return "__shfl_up_sync";
    case WarpOp::kShflDown: return "__shfl_down_sync";
    case WarpOp::kShflXor: return "__shfl_xor_sync";
    case WarpOp::kBallot: return "__ballot_sync";
    case WarpOp::kAny: return "__any_sync";
    case WarpOp::kAll: return "__all_sync";
    case WarpOp::kMatchAny: return "__match_any_sync";
    case WarpOp::kMatchAll: return "__match_all_sync";
    case WarpOp::kReduce: return "__reduce_*_sync";
    case WarpOp::kMma: return "mma.sync";
    case WarpOp::kLdmatrix: return "ldmatrix";
  }
  return "?";
}

inline std::string hex(unsigned v) {
  std::ostringstream s;
  s << "0x" << std::hex << v;
  return s.str();
}

inline std::string lanes_of(unsigned mask) {
  std::string s;
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1) s += (s.empty() ? "" : ",") + std::to_string(l);
  return "{" + s + "}";
}

// What one lane brings to a collective.
struct LaneData {
  alignas(8) unsigned char bytes[48];
  int arg;    // srcLane / delta / laneMask, or the reduction kind
  int width;  // shuffles: segment width
};

struct Collective {
  WarpOp op;
  int qualifier;  // e.g. ldmatrix .x1/.x2/.x4 and .trans; must match too
  unsigned mask;
  unsigned arrived = 0;
  int waiting = 0;
  std::atomic<int> state{0};  // 0 pending, 1 done, 2 the block faulted
  Site site[32];
  LaneData lane[32];
};

class Block {
 public:
  Block(dim3 grid, dim3 block, uint3 block_idx)
      : grid_(grid), dim_(block), idx_(block_idx),
        nthreads_(static_cast<int>(block.x * block.y * block.z)), live_(nthreads_),
        exited_(nthreads_, 0), bar_site_(nthreads_, Site{"", 0}), warps_((nthreads_ + 31) / 32) {
    for (int w = 0; w < static_cast<int>(warps_.size()); ++w) {
      const int n = std::min(32, nthreads_ - 32 * w);
      warps_[w].present = n == 32 ? ~0u : (1u << n) - 1;
    }
  }

  int nthreads() const { return nthreads_; }
  uint3 index() const { return idx_; }
  dim3 dim() const { return dim_; }
  dim3 grid() const { return grid_; }
  bool faulted() const { return faulted_.load(std::memory_order_acquire); }
  std::string fault_message() {
    std::lock_guard<std::mutex> lock(m_);
    return fault_;
  }
  // A counter of sync events and exits: the watchdog's sign of progress.
  uint64_t events() const { return events_.load(std::memory_order_relaxed); }

  // "block (x,y,z) thread (x,y,z)" of linear thread `tid`.
  std::string thread_name(int tid) const {
    const int tx = tid % dim_.x, ty = (tid / dim_.x) % dim_.y, tz = tid / (dim_.x * dim_.y);
    std::ostringstream s;
    s << "block (" << idx_.x << "," << idx_.y << "," << idx_.z << ") thread (" << tx << "," << ty
      << "," << tz << ")";
    return s.str();
  }

  // Records a fault (the first one wins) and throws KernelFault in the calling thread.
  [[noreturn]] void fault(std::unique_lock<std::mutex>& lock, const std::string& what) {
    record_fault(lock, what);
    lock.unlock();
    throw KernelFault{};
  }

  // Records a fault without throwing (from outside the kernel).
  void fault_quietly(const std::string& what) {
    std::unique_lock<std::mutex> lock(m_);
    record_fault(lock, what);
  }

  // Called from outside the lock (e.g. a PTX model's argument check).
  [[noreturn]] void fault(const std::string& what) {
    std::unique_lock<std::mutex> lock(m_);
    fault(lock, what);
  }

  // __syncthreads and its _count/_and/_or forms: how many threads passed a true predicate,
  // of how many that met. Exited threads leave the barrier.
  struct BarrierResult {
    int count, participants;
  };
  BarrierResult barrier(int tid, Site site, bool pred) {
    std::unique_lock<std::mutex> lock(m_);
    throw_if_faulted(lock);
    bar_site_[tid] = site;
    bar_tids_.push_back(tid);
    bar_count_ += pred ? 1 : 0;
    events_.fetch_add(1, std::memory_order_relaxed);
    if (static_cast<int>(bar_tids_.size()) == live_) return complete_barrier(lock);
    const int generation = bar_word_.load(std::memory_order_relaxed);
    ++bar_waiting_;
    ++blocked_;
    check_deadlock(lock);
    lock.unlock();
    wait_for_change(bar_word_, generation);
    if (faulted()) throw KernelFault{};
    return bar_result_;  // written before the release of bar_word_, not yet overwritten
  }

  // Waits until every lane of `mask` has arrived at a collective of the same kind,
  // qualifier and mask; returns it (every lane's data) for the caller to compute its
  // result. `orders_memory`: __syncwarp; the others move values only, so their exchange
  // is hidden from TSan (see sanitizer.h), as is the caller's use of the result.
  std::shared_ptr<const Collective> collective(int tid, WarpOp op, int qualifier, unsigned mask,
                                               const LaneData& mine, Site site) {
    const int lane = tid % 32;
    Warp& warp = warps_[tid / 32];
    std::unique_lock<std::mutex> lock(m_);
    throw_if_faulted(lock);
    auto here = [&] { return std::string(op_name(op)) + " at " + site.str(); };
    if (!(mask >> lane & 1))
      fault(lock, thread_name(tid) + ": " + here() + " with mask " + hex(mask) +
                      " that leaves out the executing lane " + std::to_string(lane));
    const unsigned gone = mask & ~(warp.present & ~warp.exited);
    if (gone)
      fault(lock, thread_name(tid) + ": " + here() + " with mask " + hex(mask) + " names lanes " +
                      lanes_of(gone) +
                      " that have exited or do not exist (a GPU would leave their values "
                      "undefined or hang)");
    std::shared_ptr<Collective> c;
    for (auto& p : warp.pending)
      if (p->mask == mask) c = p;
    if (c && (c->op != op || c->qualifier != qualifier))
      fault(lock, thread_name(tid) + ": lanes of one warp meet with mask " + hex(mask) +
                      " at different warp intrinsics: " + here() + " and " + op_name(c->op) +
                      " at " + c->site[__builtin_ctz(c->arrived)].str());
    if (!c) {
      c = std::make_shared<Collective>();
      c->op = op;
      c->qualifier = qualifier;
      c->mask = mask;
      warp.pending.push_back(c);
    }
    c->lane[lane] = mine;
    c->site[lane] = site;
    c->arrived |= 1u << lane;
    events_.fetch_add(1, std::memory_order_relaxed);
    if (c->arrived == mask) {
      blocked_ -= c->waiting;
      warp.pending.erase(std::find(warp.pending.begin(), warp.pending.end(), c));
      c->state.store(1, std::memory_order_release);
      futex_wake_all(c->state);
      return c;
    }
    ++c->waiting;
    ++blocked_;
    check_deadlock(lock);
    lock.unlock();
    if (wait_for_change(c->state, 0) != 1) throw KernelFault{};
    return c;
  }

  // Thread `tid` returned from the kernel (or was unwound by a fault).
  void exit_thread(int tid) {
    std::unique_lock<std::mutex> lock(m_);
    exited_[tid] = 1;
    --live_;
    events_.fetch_add(1, std::memory_order_relaxed);
    if (faulted()) return;
    Warp& warp = warps_[tid / 32];
    const int lane = tid % 32;
    warp.exited |= 1u << lane;
    for (auto& c : warp.pending)
      if (c->mask >> lane & 1) {
        record_fault(lock, thread_name(tid) + " exited while lanes " + lanes_of(c->arrived) +
                               " wait for it in " + op_name(c->op) + " (mask " + hex(c->mask) +
                               ") at " + c->site[__builtin_ctz(c->arrived)].str());
        return;
      }
    if (!bar_tids_.empty() && static_cast<int>(bar_tids_.size()) == live_) {
      try {
        complete_barrier(lock);
      } catch (const KernelFault&) {
      }
      return;
    }
    if (live_ > 0 && blocked_ == live_) record_fault(lock, "deadlock: " + describe_waits());
  }

  // Who waits where (for deadlock and watchdog reports). Call with the lock held.
  std::string describe_waits() const {
    std::ostringstream s;
    s << "every live thread of the block waits and none can go on";
    if (!bar_tids_.empty())
      s << "\n  " << bar_tids_.size() << " thread(s) at __syncthreads, first at "
        << bar_site_[bar_tids_.front()].str();
    for (size_t w = 0; w < warps_.size(); ++w)
      for (auto& c : warps_[w].pending)
        s << "\n  warp " << w << ": lanes " << lanes_of(c->arrived) << " in " << op_name(c->op)
          << " (mask " << hex(c->mask) << ") at " << c->site[__builtin_ctz(c->arrived)].str()
          << ", waiting for lanes " << lanes_of(c->mask & ~c->arrived);
    return s.str();
  }

  std::string describe_waits_locked() {
    std::lock_guard<std::mutex> lock(m_);
    std::ostringstream s;
    s << live_ << " of " << nthreads_ << " threads live, " << blocked_ << " waiting";
    if (!bar_tids_.empty())
      s << "; " << bar_tids_.size() << " at __syncthreads (" << bar_site_[bar_tids_.front()].str()
        << ")";
    return s.str();
  }

 private:
  struct Warp {
    std::vector<std::shared_ptr<Collective>> pending;
    unsigned present = 0, exited = 0;
  };

  // Wakes every waiting thread of the block; they throw KernelFault.
  void record_fault(std::unique_lock<std::mutex>&, const std::string& what) {
    if (!faulted()) {
      fault_ = what;
      faulted_.store(true, std::memory_order_release);
    }
    bar_word_.fetch_add(1, std::memory_order_release);
    futex_wake_all(bar_word_);
    for (auto& w : warps_)
      for (auto& c : w.pending) {
        c->state.store(2, std::memory_order_release);
        futex_wake_all(c->state);
      }
  }

  void throw_if_faulted(std::unique_lock<std::mutex>& lock) {
    if (faulted()) {
      lock.unlock();
      throw KernelFault{};
    }
  }

  void check_deadlock(std::unique_lock<std::mutex>& lock) {
    if (live_ > 0 && blocked_ == live_) fault(lock, "deadlock: " + describe_waits());
  }

  // Every live thread is at the barrier: check they came through one __syncthreads, then
  // release them.
  BarrierResult complete_barrier(std::unique_lock<std::mutex>& lock) {
    const Site first = bar_site_[bar_tids_.front()];
    for (int t : bar_tids_)
      if (!(bar_site_[t] == first))
        fault(lock, thread_name(t) + " is at __syncthreads at " + bar_site_[t].str() + " while " +
                        thread_name(bar_tids_.front()) + " is at " + first.str() +
                        " (a barrier in divergent code: undefined on a GPU)");
    bar_result_ = {bar_count_, static_cast<int>(bar_tids_.size())};
    bar_count_ = 0;
    bar_tids_.clear();
    blocked_ -= bar_waiting_;
    bar_waiting_ = 0;
    bar_word_.fetch_add(1, std::memory_order_release);
    futex_wake_all(bar_word_);
    return bar_result_;
  }

  dim3 grid_, dim_;
  uint3 idx_;
  int nthreads_;
  std::mutex m_;
  int live_, blocked_ = 0;
  std::vector<char> exited_;
  std::atomic<bool> faulted_{false};
  std::string fault_;
  std::atomic<uint64_t> events_{0};
  // __syncthreads
  std::atomic<int> bar_word_{0};  // generation: + 1 at every completion (and at a fault)
  std::vector<Site> bar_site_;
  std::vector<int> bar_tids_;
  int bar_waiting_ = 0, bar_count_ = 0;
  BarrierResult bar_result_{0, 0};
  std::vector<Warp> warps_;
};

}  // namespace cpu_model
}  // namespace moe_ext
