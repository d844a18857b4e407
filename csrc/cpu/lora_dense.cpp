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
#include <vector>

#include "../checks.h"
#include "simd.h"

namespace moe_ext {
namespace cpu {
namespace {

// B_all (O, E*R): B_all[o, e*R + r] = lora_B[e, o, r] (a copy of the weights, O*E*R values).
Tensor b_all(const Tensor& B) {
  return aten::reshape(aten::permute(B, {1, 0, 2}), {B.size(1), B.size(0) * B.size(2)});
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
Tensor expand(const Tensor& h, const Tensor& B, const Tensor& w, const Tensor& ex, int64_t E,
              int64_t R, double scaling) {
  const int64_t T = h.size(0), K = ex.size(1);
  Tensor gated = aten::zeros_like(h);
  dispatch_floating(h.scalar_type(), "lora_dense_expand_cpu", [&](auto tag) {
    using acc_t = decltype(tag);
    const acc_t *hp = h.const_data_ptr<acc_t>(), *wp = w.const_data_ptr<acc_t>();
    const int64_t* ep = ex.const_data_ptr<int64_t>();
    acc_t* gp = gated.mutable_data_ptr<acc_t>();
    const acc_t s = static_cast<acc_t>(scaling);
    torch::stable::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> sum(E, 0);
      std::vector<int64_t> chosen;
      for (int64_t t = t0; t < t1; ++t)
        for_each_gate(ep + t * K, wp + t * K, K, E, sum, chosen, [&](int64_t e, acc_t g) {
          const int64_t base = t * E * R + e * R;
          for (int64_t r = 0; r < R; ++r) gp[base + r] = s * g * hp[base + r];
        });
    });
  }, /*low_precision=*/false);
  return aten::mm(gated, aten::t2(aten::to(b_all(B), h.scalar_type())));
}

// The expand's gradients, all in acc (dy, h contiguous in acc): dh = d(gated) * gate (T, E*R),
// dw (T, K) and dB (E, O, R).
struct ExpandGrads {
  Tensor dh, dw, dB;
};

ExpandGrads expand_backward(const Tensor& dy, const Tensor& h, const Tensor& B, const Tensor& w,
                            const Tensor& ex, int64_t E, int64_t R, double scaling) {
  const ScalarType acc = h.scalar_type();
  const int64_t T = h.size(0), O = B.size(1), K = ex.size(1);
  const Tensor d_gated = aten::contiguous(aten::mm(dy, aten::to(b_all(B), acc)));  // (T, E*R)
  Tensor gated = aten::zeros_like(h), dh = aten::zeros_like(h);
  Tensor dw = aten::empty_like(w);
  dispatch_floating(acc, "lora_dense_expand_backward_cpu", [&](auto tag) {
    using acc_t = decltype(tag);
    const acc_t *hp = h.const_data_ptr<acc_t>(), *dgp = d_gated.const_data_ptr<acc_t>(),
                *wp = w.const_data_ptr<acc_t>();
    const int64_t* ep = ex.const_data_ptr<int64_t>();
    acc_t *gp = gated.mutable_data_ptr<acc_t>(), *dhp = dh.mutable_data_ptr<acc_t>(),
          *dwp = dw.mutable_data_ptr<acc_t>();
    const acc_t s = static_cast<acc_t>(scaling);
    torch::stable::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
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
  }, /*low_precision=*/false);
  const Tensor dB =
      aten::permute(aten::view(aten::mm(aten::t2(dy), gated), {O, E, R}), {1, 0, 2});  // (E, O, R)
  return {dh, dw, dB};
}

std::tuple<Tensor, Tensor> lora_dense_forward_cpu(const Tensor& x_in, const Tensor& A_in,
                                                  const Tensor& B_in, const Tensor& w_in,
                                                  const Tensor& experts_in, double scaling,
                                                  int64_t num_null_experts) {
  check_lora_forward_args(x_in, A_in, B_in, w_in, experts_in, scaling, num_null_experts);
  const ScalarType dt = x_in.scalar_type(), acc = acc_type_of(dt);
  const Tensor w = aten::contiguous(w_in), ex = aten::contiguous(experts_in);
  const int64_t D = x_in.size(1), E = A_in.size(0), R = A_in.size(1);
  check_expert_ids(ex, E, num_null_experts);
  // GEMMs and gate in the accumulation dtype (no-ops for fp32 / fp64): a bf16 / fp16 gated h
  // could overflow where y does not.
  const Tensor h_all = aten::mm(
      aten::to(x_in, acc), aten::t2(aten::to(aten::reshape(A_in, {E * R, D}), acc)));  // (T, E*R)
  const Tensor y = expand(h_all, B_in, w, ex, E, R, scaling);                        // (T, O)
  return {aten::to(y, dt), aten::to(h_all, dt)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lora_dense_backward_cpu(
    const Tensor& grad_y_in, const Tensor& x_in, const Tensor& A_in, const Tensor& B_in,
    const Tensor& w_in, const Tensor& experts_in, const Tensor& h_all_in, double scaling,
    int64_t num_null_experts) {
  check_lora_dense_backward_args(grad_y_in, x_in, A_in, B_in, w_in, experts_in, h_all_in, scaling,
                                 num_null_experts);
  const ScalarType dt = x_in.scalar_type(), acc = acc_type_of(dt);
  // Everything in the accumulation dtype (as the forward); h_all rounded to x's dtype first,
  // as the op's contract reads it in x's dtype.
  const Tensor x = aten::to(x_in, acc), w = aten::contiguous(w_in),
               ex = aten::contiguous(experts_in), dy = aten::to(aten::to(grad_y_in, dt), acc),
               h = aten::contiguous(aten::to(aten::to(h_all_in, dt), acc));
  const int64_t D = x.size(1), E = A_in.size(0), R = A_in.size(1);
  check_expert_ids(ex, E, num_null_experts);
  const ExpandGrads g = expand_backward(dy, h, B_in, w, ex, E, R, scaling);
  const Tensor dx = aten::mm(g.dh, aten::to(aten::reshape(A_in, {E * R, D}), acc));  // (T, D)
  const Tensor dA = aten::view(aten::mm(aten::t2(g.dh), x), {E, R, D});              // (E, R, D)
  return {aten::to(dx, dt), g.dw, aten::to(dA, dt), aten::contiguous(aten::to(g.dB, dt))};
}

Tensor lora_dense_expand_cpu(const Tensor& h_all_in, const Tensor& B_in, const Tensor& w_in,
                             const Tensor& experts_in, double scaling, int64_t num_null_experts) {
  check_lora_dense_expand_args(h_all_in, B_in, w_in, experts_in, scaling, num_null_experts);
  const ScalarType dt = h_all_in.scalar_type(), acc = acc_type_of(dt);
  const Tensor w = aten::contiguous(w_in), ex = aten::contiguous(experts_in);
  const int64_t E = B_in.size(0), R = B_in.size(2);
  check_expert_ids(ex, E, num_null_experts);
  return aten::to(expand(aten::contiguous(aten::to(h_all_in, acc)), B_in, w, ex, E, R, scaling),
                  dt);
}

std::tuple<Tensor, Tensor, Tensor> lora_dense_expand_backward_cpu(
    const Tensor& grad_y_in, const Tensor& h_all_in, const Tensor& B_in, const Tensor& w_in,
    const Tensor& experts_in, double scaling, int64_t num_null_experts) {
  check_lora_dense_expand_backward_args(grad_y_in, h_all_in, B_in, w_in, experts_in, scaling,
                                        num_null_experts);
  const ScalarType dt = h_all_in.scalar_type(), acc = acc_type_of(dt);
  const Tensor w = aten::contiguous(w_in), ex = aten::contiguous(experts_in),
               dy = aten::to(aten::to(grad_y_in, dt), acc),
               h = aten::contiguous(aten::to(h_all_in, acc));
  const int64_t E = B_in.size(0), R = B_in.size(2);
  check_expert_ids(ex, E, num_null_experts);
  const ExpandGrads g = expand_backward(dy, h, B_in, w, ex, E, R, scaling);
  return {aten::to(g.dh, dt), g.dw, aten::contiguous(aten::to(g.dB, dt))};
}

}  // namespace
}  // namespace cpu
}  // namespace moe_ext

STABLE_TORCH_LIBRARY_IMPL(moe_ext, CPU, m) {
  m.impl("lora_dense_forward", TORCH_BOX(&moe_ext::cpu::lora_dense_forward_cpu));
  m.impl("lora_dense_backward", TORCH_BOX(&moe_ext::cpu::lora_dense_backward_cpu));
  m.impl("lora_dense_expand", TORCH_BOX(&moe_ext::cpu::lora_dense_expand_cpu));
  m.impl("lora_dense_expand_backward", TORCH_BOX(&moe_ext::cpu::lora_dense_expand_backward_cpu));
}
