// What the CPU execution model tells ThreadSanitizer (nothing in other builds). The
// threads of a block are real threads, so TSan sees every race between them; barriers and
// __syncwarp order memory through the model's locks and atomics. The other warp
// intrinsics (shuffles, votes, match, reduce, mma, ldmatrix) do not order memory on a GPU,
// so their exchange of values runs inside an ignore region: TSan derives no
// happens-before from them, and a kernel that relies on them for memory ordering shows
// up as a race. Blocks run one after another, each ordered after the previous one, so
// races between blocks are not visible (see csrc/cuda/README.md).
#pragma once
#include <cstddef>

#if defined(__SANITIZE_THREAD__)
#define MOE_CPU_MODEL_TSAN 1
extern "C" {
void AnnotateIgnoreReadsBegin(const char* file, int line);
void AnnotateIgnoreReadsEnd(const char* file, int line);
void AnnotateIgnoreWritesBegin(const char* file, int line);
void AnnotateIgnoreWritesEnd(const char* file, int line);
void AnnotateIgnoreSyncBegin(const char* file, int line);
void AnnotateIgnoreSyncEnd(const char* file, int line);
}
#endif

namespace moe_ext {
namespace cpu_model {
namespace tsan {

// While alive (and `on`), this thread's reads, writes and synchronisation are invisible
// to TSan.
class IgnoreAll {
 public:
  explicit IgnoreAll(bool on) : on_(on) {
#if defined(MOE_CPU_MODEL_TSAN)
    if (on_) {
      AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
      AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
      AnnotateIgnoreSyncBegin(__FILE__, __LINE__);
    }
#endif
  }
  ~IgnoreAll() {
#if defined(MOE_CPU_MODEL_TSAN)
    if (on_) {
      AnnotateIgnoreSyncEnd(__FILE__, __LINE__);
      AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
      AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
    }
#endif
  }
  IgnoreAll(const IgnoreAll&) = delete;
  IgnoreAll& operator=(const IgnoreAll&) = delete;

 private:
  bool on_;
};

}  // namespace tsan
}  // namespace cpu_model
}  // namespace moe_ext
