// route / route_backward (csrc/cuda/route.cu) on the CPU execution model against the
// float64 reference: the cases of tests/ops/test_route.py.
#include <cmath>
#include <string>

#include "harness.h"
#include "ops.h"
#include "reference.h"

namespace cuda_cpu {
namespace {

struct Routed {
  std::vector<double> probs, weights;
  std::vector<int64_t> experts, counts;
};

Routed run_route(DType t, const std::vector<double>& logits, const std::vector<double>& bias,
                 int64_t T, int64_t M, int64_t K, double tau, bool normalize) {
  const DType acc = acc_of(t);
  const RouteOut r = route(t, to_device(logits, t), bias.empty() ? Buffer() : to_device(bias, acc),
                           T, M, K, tau, normalize);
  return {to_host(r.probs, acc, T * M), to_host(r.weights, acc, T * K),
          ints_to_host(r.experts, T * K), ints_to_host(r.counts, M)};
}

void expect_routing(const Routed& got, const ref::Routing& want, double tol) {
  expect_close("probs", got.probs, want.probs, tol);
  expect_close("weights", got.weights, want.weights, tol);
  expect_equal("experts", got.experts, want.experts);
  expect_equal("counts", got.counts, want.counts);
}

void parity(int64_t T, int64_t M, int64_t K, bool normalize, double tau, bool use_bias) {
  const auto logits = randn(T * M, T * M + K);
  const auto bias = use_bias ? randn(M, 7 * M + 1) : std::vector<double>{};
  expect_routing(run_route(DType::kFloat64, logits, bias, T, M, K, tau, normalize),
                 ref::route(logits, bias, T, M, K, tau, normalize), 1e-13);
}

struct Shape {
  int64_t T, M, K;
};
const Shape kShapes[] = {{1, 1, 1}, {7, 4, 2}, {33, 8, 8}, {64, 12, 3}, {5, 40, 11}};
const struct {
  double tau;
  bool bias;
} kTemps[] = {{1.0, false}, {0.5, true}, {2.0, true}};

const bool kRegistered = [] {
  // Every (normalize, temperature, bias) on the small shapes; two on the larger ones
  // (each warp of the route kernel meets ~10 K times, and a meeting costs 32 wake-ups).
  for (const Shape& s : kShapes)
    for (bool normalize : {true, false})
      for (const auto& tb : kTemps) {
        const bool large = s.T * s.K > 100;
        if (large && normalize != tb.bias) continue;
        const std::string name = "route/parity T" + std::to_string(s.T) + " M" + std::to_string(s.M) +
                                 " K" + std::to_string(s.K) + (normalize ? " norm" : "") + " tau" +
                                 std::to_string(tb.tau).substr(0, 3) + (tb.bias ? " bias" : "");
        const bool tsan = s.T == 33 && normalize && tb.bias && tb.tau == 0.5;
        Register(name, tsan ? "tsan" : "", [=] { parity(s.T, s.M, s.K, normalize, tb.tau, tb.bias); });
      }
  for (DType t : {DType::kFloat32, DType::kFloat16, DType::kBFloat16})
    Register(std::string("route/low precision logits route in float32 ") + dtype_name(t), "", [t] {
      const auto logits = rounded(randn(50 * 6, 3), t);
      const Routed got = run_route(t, logits, {}, 50, 6, 2, 1.0, true);
      expect_routing(got, ref::route(logits, {}, 50, 6, 2, 1.0, true), 1e-6);
    });
  return true;
}();

CUDA_CPU_CASE("route/ties pick the lower id", "", [] {
  std::vector<double> logits(3 * 5, 0.0);
  Routed r = run_route(DType::kFloat32, logits, {}, 3, 5, 3, 1.0, true);
  expect_equal("experts", r.experts, std::vector<int64_t>{0, 1, 2, 0, 1, 2, 0, 1, 2});
  expect_close("weights", r.weights, std::vector<double>(9, 1.0 / 3), 1e-7);
  for (int t = 0; t < 3; ++t) logits[t * 5 + 3] = 1.0;
  r = run_route(DType::kFloat32, logits, {}, 3, 5, 3, 1.0, true);
  expect_equal("experts", r.experts, std::vector<int64_t>{3, 0, 1, 3, 0, 1, 3, 0, 1});
});

CUDA_CPU_CASE("route/all tokens on one expert", "", [] {
  const auto logits = randn(100 * 6, 11);
  const std::vector<double> bias = {0, 0, 0, 50, 0, 0};
  const Routed r = run_route(DType::kFloat32, logits, bias, 100, 6, 1, 1.0, true);
  expect_equal("experts", r.experts, std::vector<int64_t>(100, 3));
  expect_equal("counts", r.counts, std::vector<int64_t>{0, 0, 0, 100, 0, 0});
});

CUDA_CPU_CASE("route/T=0 launches nothing", "", [] {
  const Routed r = run_route(DType::kFloat32, {}, {}, 0, 4, 2, 1.0, true);
  expect_equal("counts", r.counts, std::vector<int64_t>(4, 0));
});

CUDA_CPU_CASE("route/NaN logits keep ids in range", "", [] {
  auto logits = randn(9 * 5, 5);
  logits[2 * 5 + 1] = NAN;
  const Routed r = run_route(DType::kFloat32, logits, {}, 9, 5, 2, 1.0, true);
  for (int64_t e : r.experts) check(e >= 0 && e < 5, "expert id ", e, " out of [0, 5)");
});

void backward(bool normalize, bool with_grad_probs) {
  const int64_t T = 64, M = 24, K = 3;
  const double tau = 1.3;
  const auto logits = randn(T * M, 1);
  const auto gp = with_grad_probs ? randn(T * M, 2) : std::vector<double>{};
  const auto gw = randn(T * K, 3);
  const RouteOut r = route(DType::kFloat64, to_device(logits, DType::kFloat64), Buffer(), T, M, K,
                           tau, normalize);
  const Buffer got = route_backward(DType::kFloat64, gp.empty() ? Buffer() : to_device(gp, DType::kFloat64),
                                    to_device(gw, DType::kFloat64), r, T, M, K, tau, normalize);
  const ref::Routing want_r = ref::route(logits, {}, T, M, K, tau, normalize);
  expect_close("dlogits", to_host(got, DType::kFloat64, T * M),
               ref::route_backward(gp, gw, want_r, T, M, K, tau, normalize), 1e-11);
}

CUDA_CPU_CASE("route/backward normalized", "tsan", [] { backward(true, true); });
CUDA_CPU_CASE("route/backward unnormalized", "", [] { backward(false, true); });
CUDA_CPU_CASE("route/backward without grad_probs", "", [] { backward(true, false); });

// The reference's gradient against central differences of the reference forward.
CUDA_CPU_CASE("reference/route backward = finite differences", "", [] {
  const int64_t T = 3, M = 6, K = 3;
  for (bool normalize : {true, false}) {
    const auto logits = randn(T * M, 21), gp = randn(T * M, 22), gw = randn(T * K, 23);
    auto loss = [&](const std::vector<double>& l) {
      const ref::Routing r = ref::route(l, {}, T, M, K, 0.7, normalize);
      double s = 0;
      for (int64_t i = 0; i < T * M; ++i) s += gp[i] * r.probs[i];
      for (int64_t i = 0; i < T * K; ++i) s += gw[i] * r.weights[i];
      return s;
    };
    const auto grad = ref::route_backward(gp, gw, ref::route(logits, {}, T, M, K, 0.7, normalize),
                                          T, M, K, 0.7, normalize);
    for (int64_t i = 0; i < T * M; ++i) {
      auto up = logits, down = logits;
      up[i] += 1e-6;
      down[i] -= 1e-6;
      const double fd = (loss(up) - loss(down)) / 2e-6;
      check(std::fabs(fd - grad[i]) < 1e-7, "dlogits[", i, "] = ", grad[i], ", finite differences ", fd);
    }
  }
});

}  // namespace
}  // namespace cuda_cpu
