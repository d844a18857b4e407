// Runs kernel launches for the CPU execution model: one host thread per CUDA thread (a
// pool of workers, reused), the blocks of a grid one after the other, shared memory
// poisoned (0xff bytes: NaN in every float type, -1 in integers) at the start of every
// block, launch-configuration checks as on a GPU, and a watchdog that ends the process
// when a block makes no progress (a thread spinning forever, or waiting for another
// block, which the model never runs at the same time).
//
// Static __shared__ variables are function-local statics (see cuda_model.h); the linker
// script shared_memory.ld gathers the zero-initialised ones of namespace moe_ext::cuda
// between __moe_shared_start and __moe_shared_end, which is how the model finds them.
#pragma once
#include <pthread.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "block.h"
#include "runtime.h"

extern "C" char __moe_shared_start[], __moe_shared_end[];

// The built-in variables, per CUDA thread (per worker thread).
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace moe_ext {
namespace cpu_model {

// cp.async copies in flight of one thread (ptx_model.h).
struct AsyncCopy {
  void* dst;
  unsigned char data[16];
  int group;  // -1: not yet committed
};
constexpr int kMaxAsyncCopies = 128;

// The model's per-CUDA-thread state, in the worker's thread-local storage.
struct ThreadContext {
  Block* block = nullptr;
  int tid = 0;
  int copies = 0;          // entries of `copy` in use
  int committed_groups = 0;
  AsyncCopy copy[kMaxAsyncCopies];
};

inline thread_local ThreadContext this_thread;

// The block of the calling CUDA thread (device functions outside a launch are an error).
inline Block& current_block() {
  if (this_thread.block == nullptr) {
    std::fprintf(stderr, "[cuda-cpu-model] a device function was called outside a kernel launch\n");
    std::abort();
  }
  return *this_thread.block;
}

inline size_t static_shared_bytes() { return static_cast<size_t>(__moe_shared_end - __moe_shared_start); }

// Fills [p, p + n) with 0xff without ASan's checks (static shared memory holds ASan's
// redzones between variables, which must stay as they are in ASan's shadow only).
__attribute__((no_sanitize_address)) inline void poison(void* p, size_t n) {
  volatile unsigned char* b = static_cast<volatile unsigned char*>(p);
  for (size_t i = 0; i < n; ++i) b[i] = 0xff;
}

// Seconds without progress before the watchdog ends the process (MOE_CPU_MODEL_TIMEOUT_S).
inline double watchdog_seconds() {
  const char* v = std::getenv("MOE_CPU_MODEL_TIMEOUT_S");
  return v ? std::atof(v) : 60.0;
}

class Executor {
 public:
  static Executor& instance() {
    static Executor executor;
    return executor;
  }

  // Runs `body` (the kernel with its arguments) for every thread of every block of the
  // grid, blocks in turn. Returns false after a fault (recorded as a sticky error).
  bool run(const std::string& kernel, dim3 grid, dim3 block_dim, size_t dynamic_smem,
           const std::function<void()>& body) {
    const int n = static_cast<int>(block_dim.x * block_dim.y * block_dim.z);
    ensure_workers(n);
    dynamic_.assign(dynamic_smem, 0);
    bool ok = true;
    for (unsigned z = 0; z < grid.z && ok; ++z)
      for (unsigned y = 0; y < grid.y && ok; ++y)
        for (unsigned x = 0; x < grid.x && ok; ++x) {
          auto block = std::make_unique<Block>(grid, block_dim, uint3{x, y, z});
          Block* b = block.get();
          // Shared memory starts as garbage in every block.
          poison(__moe_shared_start, static_shared_bytes());
          if (!dynamic_.empty()) poison(dynamic_.data(), dynamic_.size());
          run_block(b, n, body);
          if (b->faulted()) {
            ok = false;
            set_error(cudaErrorLaunchFailure,
                      "kernel " + kernel + ": " + b->fault_message(), /*sticky=*/true);
          }
        }
    return ok;
  }

  void* dynamic_shared() { return dynamic_.empty() ? nullptr : dynamic_.data(); }

  // Is [p, p + n) inside the shared memory of the running block?
  bool is_shared(const void* p, size_t n) const {
    const char* c = static_cast<const char*>(p);
    if (c >= __moe_shared_start && c + n <= __moe_shared_end) return true;
    const char* d = reinterpret_cast<const char*>(dynamic_.data());
    return !dynamic_.empty() && c >= d && c + n <= d + dynamic_.size();
  }

  ~Executor() {
    for (auto& w : workers_) {
      w->stop.store(true, std::memory_order_relaxed);
      w->job.fetch_add(1, std::memory_order_release);
      futex_wake_all(w->job);
      pthread_join(w->thread, nullptr);
    }
  }

 private:
  struct Worker {
    Executor* owner;
    int index;
    pthread_t thread;
    std::atomic<int> job{0};  // + 1 for every block to run (release: job_ is ready)
    std::atomic<bool> stop{false};
  };

  // The running block (read by the workers after their wake-up).
  struct Job {
    Block* block = nullptr;
    const std::function<void()>* body = nullptr;
  };

  void ensure_workers(int n) {
    while (static_cast<int>(workers_.size()) < n) {
      auto w = std::make_unique<Worker>();
      w->owner = this;
      w->index = static_cast<int>(workers_.size());
      pthread_attr_t attr;
      pthread_attr_init(&attr);
      pthread_attr_setstacksize(&attr, 1 << 20);  // kernels keep small frames
      if (pthread_create(&w->thread, &attr, &Executor::worker_main, w.get()) != 0) {
        std::fprintf(stderr, "[cuda-cpu-model] cannot start worker thread %d\n", w->index);
        std::abort();
      }
      pthread_attr_destroy(&attr);
      workers_.push_back(std::move(w));
    }
  }

  void run_block(Block* b, int n, const std::function<void()>& body) {
    job_ = Job{b, &body};
    running_ = n;
    finished_.store(0, std::memory_order_relaxed);
    for (int i = 0; i < n; ++i) {
      Worker& w = *workers_[i];
      w.job.fetch_add(1, std::memory_order_release);
      futex_wake_all(w.job);
    }
    const double limit = watchdog_seconds();
    uint64_t seen = b->events();
    auto last_progress = std::chrono::steady_clock::now();
    const timespec tick{0, 200 * 1000 * 1000};
    for (int f; (f = finished_.load(std::memory_order_acquire)) < n;) {
      futex_wait(finished_, f, &tick);
      if (b->events() != seen) {
        seen = b->events();
        last_progress = std::chrono::steady_clock::now();
      } else if (std::chrono::duration<double>(std::chrono::steady_clock::now() - last_progress)
                     .count() > limit) {
        watchdog_abort(b, n, limit);
      }
    }
  }

  [[noreturn]] void watchdog_abort(Block* b, int n, double limit) {
    std::fprintf(stderr,
                 "[cuda-cpu-model] watchdog: %s of a %d-thread block made no progress for %.0f s "
                 "(%s). A thread loops forever, or waits for another block: the model runs blocks "
                 "one after the other. Ending the process.\n",
                 b->thread_name(0).c_str(), n, limit, b->describe_waits_locked().c_str());
    std::fflush(stderr);
    std::_Exit(124);
  }

  static void* worker_main(void* arg) {
    Worker& w = *static_cast<Worker*>(arg);
    Executor& ex = *w.owner;
    int done = 0;
    for (;;) {
      done = wait_for_change(w.job, done);
      if (w.stop.load(std::memory_order_relaxed)) break;
      const Job job = ex.job_;
      run_thread(*job.block, w.index, *job.body);
      const int n = ex.running_;  // read before the count: the launcher moves on after it
      if (ex.finished_.fetch_add(1, std::memory_order_acq_rel) + 1 == n) futex_wake_all(ex.finished_);
    }
    return nullptr;
  }

  // One CUDA thread of block `b`.
  static void run_thread(Block& b, int tid, const std::function<void()>& body) {
    const dim3 d = b.dim();
    threadIdx = uint3{tid % d.x, (tid / d.x) % d.y, tid / (d.x * d.y)};
    blockIdx = b.index();
    blockDim = d;
    gridDim = b.grid();
    this_thread.block = &b;
    this_thread.tid = tid;
    this_thread.copies = 0;
    this_thread.committed_groups = 0;
    try {
      body();
    } catch (const KernelFault&) {
    } catch (const std::exception& e) {  // e.g. std::bad_alloc inside a kernel
      b.fault_quietly(b.thread_name(tid) + ": the kernel threw " + e.what());
    }
    b.exit_thread(tid);
    this_thread.block = nullptr;
  }

  std::vector<std::unique_ptr<Worker>> workers_;
  Job job_;
  int running_ = 0;                 // threads of the running block
  std::atomic<int> finished_{0};    // of them, how many have returned
  std::vector<unsigned char> dynamic_;
};

inline void* dynamic_shared_memory() { return Executor::instance().dynamic_shared(); }

}  // namespace cpu_model
}  // namespace moe_ext
