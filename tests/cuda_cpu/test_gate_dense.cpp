// gate_dense / gate_dense_backward (csrc/cuda/gate_dense.cu) on the CPU execution model
// against the float64 reference: the cases of tests/ops/test_gate_dense.py.
#include <string>

#include "harness.h"
#include "ops.h"
#include "reference.h"

namespace cuda_cpu {
namespace {

void check_gate(DType t, int64_t T, int64_t E, int64_t R, int64_t N, int64_t K,
                std::vector<int64_t> (*edit)(std::vector<int64_t>)) {
  const double s = 0.9;
  const DType acc = acc_of(t);
  const ref::Routing r = ref::route(randn(T * (E + N), 7), {}, T, E + N, K, 1.0, true);
  const std::vector<int64_t> experts = edit ? edit(r.experts) : r.experts;
  const auto w = rounded(r.weights, acc);
  const auto h_all = rounded(randn(T * E * R, 8), t), grad = rounded(randn(T * E * R, 9), t);
  const Buffer ids = ints_to_device(experts), wb = to_device(w, acc), hb = to_device(h_all, t);
  const Buffer gated = gate_dense(t, hb, wb, ids, T, E, R, K, s);
  const GateGrads g = gate_dense_backward(t, to_device(grad, t), hb, wb, ids, T, E, R, K, s);
  expect_close("gated", to_host(gated, t, T * E * R), ref::gate_dense(h_all, w, experts, T, E, R, K, s),
               tolerance(t));
  // d gated / d h_all is the same mask applied to the gradient.
  expect_close("grad_h_all", to_host(g.dh, t, T * E * R),
               ref::gate_dense(grad, w, experts, T, E, R, K, s), tolerance(t));
  expect_close("grad_w", to_host(g.dw, acc, T * K),
               ref::gate_dense_grad_w(grad, h_all, experts, T, E, R, K, s), tolerance(t));
}

const bool kRegistered = [] {
  for (DType t : {DType::kFloat64, DType::kFloat32, DType::kFloat16, DType::kBFloat16})
    Register(std::string("gate_dense/") + dtype_name(t) + " T90 E5 R6 N1 K3",
             t == DType::kFloat32 ? "tsan" : "", [t] { check_gate(t, 90, 5, 6, 1, 3, nullptr); });
  return true;
}();

CUDA_CPU_CASE("gate_dense/T=0", "", [] { check_gate(DType::kFloat32, 0, 3, 2, 0, 2, nullptr); });

CUDA_CPU_CASE("gate_dense/bad ids add nothing", "", [] {
  check_gate(DType::kFloat64, 30, 3, 4, 1, 2, [](std::vector<int64_t> e) {
    e[0] = 9;
    e[5] = -2;
    return e;
  });
});

}  // namespace
}  // namespace cuda_cpu
