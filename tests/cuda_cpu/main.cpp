// Runs the cases of `make test-cuda-cpu` (the CUDA kernels on the CPU execution model).
//   cuda_cpu_tests [-v] [--tag TAG] [--filter TEXT]... [--case NAME] [--list]
// --tag: only cases with that tag (e.g. tsan); --filter: names containing any TEXT;
// --case: exactly one case, also the "manual" ones (which must fail, for mutants.py).
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "harness.h"

int main(int argc, char** argv) {
  bool verbose = false, list = false;
  std::string tag, exact;
  std::vector<std::string> filters;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "-v") verbose = true;
    else if (a == "--list") list = true;
    else if (a == "--tag" && i + 1 < argc) tag = argv[++i];
    else if (a == "--filter" && i + 1 < argc) filters.push_back(argv[++i]);
    else if (a == "--case" && i + 1 < argc) exact = argv[++i];
    else {
      std::fprintf(stderr, "usage: %s [-v] [--tag TAG] [--filter TEXT]... [--case NAME] [--list]\n",
                   argv[0]);
      return 2;
    }
  }
  auto has_tag = [](const cuda_cpu::Case& c, const std::string& t) {
    return (" " + c.tags + " ").find(" " + t + " ") != std::string::npos;
  };
  std::vector<const cuda_cpu::Case*> chosen;
  for (const auto& c : cuda_cpu::registry()) {
    if (!exact.empty()) {
      if (c.name == exact) chosen.push_back(&c);
      continue;
    }
    if (has_tag(c, "manual")) continue;
    if (!tag.empty() && !has_tag(c, tag)) continue;
    bool match = filters.empty();
    for (const auto& f : filters) match = match || c.name.find(f) != std::string::npos;
    if (match) chosen.push_back(&c);
  }
  if (list) {
    for (auto* c : chosen) std::printf("%s  [%s]\n", c->name.c_str(), c->tags.c_str());
    return 0;
  }
  if (chosen.empty()) {
    std::fprintf(stderr, "no case matches\n");
    return 2;
  }
  const auto start = std::chrono::steady_clock::now();
  int failed = 0;
  for (auto* c : chosen) {
    const auto t0 = std::chrono::steady_clock::now();
    std::string error;
    try {
      c->run();
      if (cudaError_t err = cudaGetLastError())
        error = std::string("unchecked CUDA error: ") + cudaGetErrorString(err) + " (" +
                moe_ext::cpu_model::last_error_message() + ")";
    } catch (const std::exception& e) {
      error = e.what();
    }
    moe_ext::cpu_model::reset_device();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!error.empty()) {
      ++failed;
      std::printf("FAIL %s (%.2f s): %s\n", c->name.c_str(), s, error.c_str());
    } else if (verbose) {
      std::printf("ok   %s (%.2f s)\n", c->name.c_str(), s);
    }
    std::fflush(stdout);
  }
  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("%zu cases: %zu passed, %d failed in %.1f s\n", chosen.size(), chosen.size() - failed,
              failed, total);
  return failed ? 1 : 0;
}
