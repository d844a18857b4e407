// CPU kernels of the dense-gated strategy (lora_dense_forward / lora_dense_backward, and
// lora_dense_expand / lora_dense_expand_backward: the same from a given h_all):
//
//   h_all = x A_all^T            (T, E*R)  ATen GEMM, A_all = lora_A viewed as (E*R, D)
//   gated = gate(h_all)          (T, E*R)  expert e's R columns times s * (sum of token t's
//                                          weights on e, in k order); zero for experts not
//                                          chosen (null experts add nothing)
//   y     = gated B_all^T        (T, O)    ATen GEMM, B_all[o, e*R + r] = lora_B[e, o, r]
//
// The gate and its gradients run here in parallel C++ (one task per block of tokens, each
// row written by one task: deterministic for any thread count); the GEMMs are ATen's. All
// of it in the accumulation dtype (float32 for bf16 / fp16: a gated h rounded to fp16
// could overflow where y does not); outputs are rounded once to x's dtype.
// Notation: docs/architecture.md#notation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "simd.h"

namespace moe_ext {
namespace cpu {
namespace {

void check_ids(const at::Tensor& experts, int64_t E, int64_t num_null_experts) {
  const int64_t* ids = experts.data_ptr<int64_t>();
  const int64_t bad = first_bad_expert_id(ids, experts.numel(), E + num_null_experts);
  TORCH_CHECK_VALUE(bad < 0, "experts holds id ", bad < 0 ? 0 : ids[bad], " outside [0, ",
                    E + num_null_experts, ") (E=", E, " LoRA experts + num_null_experts=",
                    num_null_experts, ")");
}

// B_all (O, E*R): B_all[o, e*R + r] = lora_B[e, o, r] (a copy of the weights, O*E*R values).
at::Tensor b_all(const at::Tensor& B) {
  return B.permute({1, 0, 2}).reshape({B.size(1), B.size(0) * B.size(2)});
}

// Calls f(e, gate) once per distinct LoRA expert e chosen by token t, gate = the sum of the
// token's weights on e in k order (a repeated id sums its slots). `sum` (E,) is zero on
// entry and on exit; `chosen` is scratch.
template <typename acc_t, typename F>
inline void for_each_gate(const int64_t* ids, const acc_t* w, int64_t K, int64_t E,
                          std::vector<acc_t>& sum, std::vector<int64_t>& chosen, F&& f) {
  chosen.clear();
  for (int64_t k = 0; k < K; ++k) {
    const int64_t e = ids[k];
    if (e >= E) continue;  // null expert
    bool seen = false;
    for (int64_t c : chosen) seen = seen || c == e;
    if (!seen) chosen.push_back(e);
    sum[e] += w[k];
  }
  for (int64_t e : chosen) {
    f(e, sum[e]);
    sum[e] = 0;
  }
}

// y (T, O) = s * gate(h) B_all^T, all in acc (h: h_all in acc, contiguous).
at::Tensor expand(const at::Tensor& h, const at::Tensor& B, const at::Tensor& w,
                  const at::Tensor& ex, int64_t E, int64_t R, double scaling) {
  const int64_t T = h.size(0), K = ex.size(1);
  at::Tensor gated = at::zeros_like(h);
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "lora_dense_expand_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t *hp = h.data_ptr<acc_t>(), *wp = w.data_ptr<acc_t>();
    const int64_t* ep = ex.data_ptr<int64_t>();
    acc_t* gp = gated.data_ptr<acc_t>();
    const acc_t s = static_cast<acc_t>(scaling);
    at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> sum(E, 0);
      std::vector<int64_t> chosen;
      for (int64_t t = t0; t < t1; ++t)
        for_each_gate(ep + t * K, wp + t * K, K, E, sum, chosen, [&](int64_t e, acc_t g) {
          const int64_t base = t * E * R + e * R;
          for (int64_t r = 0; r < R; ++r) gp[base + r] = s * g * hp[base + r];
        });
    });
  });
  return at::mm(gated, b_all(B).to(h.scalar_type()).t());
}

// The expand's gradients, all in acc (dy, h contiguous in acc): dh = d(gated) * gate (T, E*R),
// dw (T, K) and dB (E, O, R).
struct ExpandGrads {
  at::Tensor dh, dw, dB;
};

ExpandGrads expand_backward(const at::Tensor& dy, const at::Tensor& h, const at::Tensor& B,
                            const at::Tensor& w, const at::Tensor& ex, int64_t E, int64_t R,
                            double scaling) {
  const at::ScalarType acc = h.scalar_type();
  const int64_t T = h.size(0), O = B.size(1), K = ex.size(1);
  const at::Tensor d_gated = at::mm(dy, b_all(B).to(acc)).contiguous();  // (T, E*R)
  at::Tensor gated = at::zeros_like(h), dh = at::zeros_like(h);
  at::Tensor dw = at::empty_like(w);
  AT_DISPATCH_FLOATING_TYPES(acc, "lora_dense_expand_backward_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t *hp = h.data_ptr<acc_t>(), *dgp = d_gated.data_ptr<acc_t>(), *wp = w.data_ptr<acc_t>();
    const int64_t* ep = ex.data_ptr<int64_t>();
    acc_t *gp = gated.data_ptr<acc_t>(), *dhp = dh.data_ptr<acc_t>(), *dwp = dw.data_ptr<acc_t>();
    const acc_t s = static_cast<acc_t>(scaling);
    at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> sum(E, 0), dot(E, 0);
      std::vector<int64_t> chosen;
      for (int64_t t = t0; t < t1; ++t) {
        for_each_gate(ep + t * K, wp + t * K, K, E, sum, chosen, [&](int64_t e, acc_t g) {
          const int64_t base = t * E * R + e * R;
          const acc_t gate = s * g;
          acc_t d = 0;
          for (int64_t r = 0; r < R; ++r) {
            gp[base + r] = gate * hp[base + r];
            dhp[base + r] = gate * dgp[base + r];
            d += dgp[base + r] * hp[base + r];
          }
          dot[e] = s * d;
        });
        // d y / d w[t,k] = s * <d_gated_e, h_e> for the slot's expert e (0 for null experts).
        for (int64_t k = 0; k < K; ++k) {
          const int64_t e = ep[t * K + k];
          dwp[t * K + k] = e < E ? dot[e] : acc_t(0);
        }
      }
    });
  });
  const at::Tensor dB = at::mm(dy.t(), gated).view({O, E, R}).permute({1, 0, 2});  // (E, O, R)
  return {dh, dw, dB};
}

std::tuple<at::Tensor, at::Tensor> lora_dense_forward_cpu(const at::Tensor& x_in,
                                                          const at::Tensor& A_in,
                                                          const at::Tensor& B_in,
                                                          const at::Tensor& w_in,
                                                          const at::Tensor& experts_in,
                                                          double scaling, int64_t num_null_experts) {
  check_lora_forward_args(x_in, A_in, B_in, w_in, experts_in, scaling, num_null_experts);
  const at::ScalarType dt = x_in.scalar_type(), acc = acc_type_of(dt);
  const at::Tensor w = w_in.contiguous(), ex = experts_in.contiguous();
  const int64_t D = x_in.size(1), E = A_in.size(0), R = A_in.size(1);
  check_ids(ex, E, num_null_experts);
  // GEMMs and gate in the accumulation dtype (no-ops for fp32 / fp64): a bf16 / fp16 gated h
  // could overflow where y does not.
  const at::Tensor h_all = at::mm(x_in.to(acc), A_in.reshape({E * R, D}).to(acc).t());  // (T, E*R)
  const at::Tensor y = expand(h_all, B_in, w, ex, E, R, scaling);                        // (T, O)
  return {y.to(dt), h_all.to(dt)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_dense_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& A_in,
    const at::Tensor& B_in, const at::Tensor& w_in, const at::Tensor& experts_in,
    const at::Tensor& h_all_in, double scaling, int64_t num_null_experts) {
  check_lora_dense_backward_args(grad_y_in, x_in, A_in, B_in, w_in, experts_in, h_all_in, scaling,
                                 num_null_experts);
  const at::ScalarType dt = x_in.scalar_type(), acc = acc_type_of(dt);
  // Everything in the accumulation dtype (as the forward); h_all rounded to x's dtype first,
  // as the op's contract reads it in x's dtype.
  const at::Tensor x = x_in.to(acc), w = w_in.contiguous(), ex = experts_in.contiguous(),
                   dy = grad_y_in.to(dt).to(acc), h = h_all_in.to(dt).to(acc).contiguous();
  const int64_t D = x.size(1), E = A_in.size(0), R = A_in.size(1);
  check_ids(ex, E, num_null_experts);
  const ExpandGrads g = expand_backward(dy, h, B_in, w, ex, E, R, scaling);
  const at::Tensor dx = at::mm(g.dh, A_in.reshape({E * R, D}).to(acc));  // (T, D)
  const at::Tensor dA = at::mm(g.dh.t(), x).view({E, R, D});             // (E, R, D)
  return {dx.to(dt), g.dw, dA.to(dt), g.dB.to(dt).contiguous()};
}

at::Tensor lora_dense_expand_cpu(const at::Tensor& h_all_in, const at::Tensor& B_in,
                                 const at::Tensor& w_in, const at::Tensor& experts_in,
                                 double scaling, int64_t num_null_experts) {
  check_lora_dense_expand_args(h_all_in, B_in, w_in, experts_in, scaling, num_null_experts);
  const at::ScalarType dt = h_all_in.scalar_type(), acc = acc_type_of(dt);
  const at::Tensor w = w_in.contiguous(), ex = experts_in.contiguous();
  const int64_t E = B_in.size(0), R = B_in.size(2);
  check_ids(ex, E, num_null_experts);
  return expand(h_all_in.to(acc).contiguous(), B_in, w, ex, E, R, scaling).to(dt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_dense_expand_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& h_all_in, const at::Tensor& B_in,
    const at::Tensor& w_in, const at::Tensor& experts_in, double scaling,
    int64_t num_null_experts) {
  check_lora_dense_expand_backward_args(grad_y_in, h_all_in, B_in, w_in, experts_in, scaling,
                                        num_null_experts);
  const at::ScalarType dt = h_all_in.scalar_type(), acc = acc_type_of(dt);
  const at::Tensor w = w_in.contiguous(), ex = experts_in.contiguous(),
                   dy = grad_y_in.to(dt).to(acc), h = h_all_in.to(acc).contiguous();
  const int64_t E = B_in.size(0), R = B_in.size(2);
  check_ids(ex, E, num_null_experts);
  const ExpandGrads g = expand_backward(dy, h, B_in, w, ex, E, R, scaling);
  return {g.dh.to(dt), g.dw, g.dB.to(dt).contiguous()};
}

}  // namespace
}  // namespace cpu
}  // namespace moe_ext

TORCH_LIBRARY_IMPL(moe_ext, CPU, m) {
  m.impl("lora_dense_forward", &moe_ext::cpu::lora_dense_forward_cpu);
  m.impl("lora_dense_backward", &moe_ext::cpu::lora_dense_backward_cpu);
  m.impl("lora_dense_expand", &moe_ext::cpu::lora_dense_expand_cpu);
  m.impl("lora_dense_expand_backward", &moe_ext::cpu::lora_dense_expand_backward_cpu);
}
