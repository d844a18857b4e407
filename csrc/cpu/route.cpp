// CPU kernels for routing: softmax(+bias, /temperature) -> top-K -> renormalise -> counts,
// and its backward to the logits.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <numeric>
#include <vector>

#include "../checks.h"
#include "simd.h"

namespace moe_ext {
namespace cpu {
namespace {

// One row: p = softmax((logits + bias) / tau); the K largest p (ties: lower index first, the
// same rule as a stable descending sort); w = p[chosen] (/ their sum). Returns false if the
// row holds a non-finite logit.
// The exponents are ((u - u_max) * (1/tau)) * 2 with u = logits/2 + bias/2: halving keeps the
// sum of two finite numbers finite, and subtracting the max before scaling keeps every
// exponent <= 0 (exactly 0 at the max), so finite inputs never give inf - inf = NaN.
template <typename scalar_t, typename acc_t>
bool route_row(const scalar_t* logits, const acc_t* bias, int64_t M, int64_t K, acc_t inv_tau,
               bool normalize, acc_t* probs, acc_t* weights, int64_t* experts,
               std::vector<int64_t>& index_buffer) {
  acc_t umax = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < M; ++j) {
    const acc_t l = static_cast<acc_t>(logits[j]);
    if (!std::isfinite(l)) return false;
    const acc_t u = bias ? l * acc_t(0.5) + bias[j] * acc_t(0.5) : l * acc_t(0.5);
    probs[j] = u;
    umax = std::max(umax, u);
  }
  acc_t total = 0;
  for (int64_t j = 0; j < M; ++j) {
    probs[j] = std::exp(((probs[j] - umax) * inv_tau) * acc_t(2));
    total += probs[j];
  }
  const acc_t inv_total = acc_t(1) / total;
  for (int64_t j = 0; j < M; ++j) probs[j] *= inv_total;

  auto before = [probs](int64_t a, int64_t b) {
    return probs[a] > probs[b] || (probs[a] == probs[b] && a < b);
  };
  if (K <= 8) {
    // Selection: K passes, each keeping the best index not yet taken.
    for (int64_t k = 0; k < K; ++k) {
      int64_t best = -1;
      for (int64_t j = 0; j < M; ++j) {
        bool taken = false;
        for (int64_t q = 0; q < k; ++q) taken |= experts[q] == j;
        if (!taken && (best < 0 || before(j, best))) best = j;
      }
      experts[k] = best;
    }
  } else {
    index_buffer.resize(M);
    std::iota(index_buffer.begin(), index_buffer.end(), int64_t(0));
    std::partial_sort(index_buffer.begin(), index_buffer.begin() + K, index_buffer.end(), before);
    std::copy(index_buffer.begin(), index_buffer.begin() + K, experts);
  }
  acc_t chosen = 0;
  for (int64_t k = 0; k < K; ++k) chosen += probs[experts[k]];
  const acc_t scale = normalize ? acc_t(1) / chosen : acc_t(1);
  for (int64_t k = 0; k < K; ++k) weights[k] = probs[experts[k]] * scale;
  return true;
}

// Every value of a float tensor finite (any float dtype, read as double).
bool all_finite(const Tensor& t) {
  const Tensor d = aten::contiguous(aten::to(t, kDouble));
  const double* p = d.const_data_ptr<double>();
  for (int64_t i = 0; i < d.numel(); ++i)
    if (!std::isfinite(p[i])) return false;
  return true;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> route_cpu(const Tensor& router_logits,
                                                     const std::optional<Tensor>& logit_bias,
                                                     int64_t top_k, double temperature,
                                                     bool normalize_weights) {
  check_route_args(router_logits, logit_bias, top_k, temperature);
  const int64_t T = router_logits.size(0), M = router_logits.size(1);
  const ScalarType acc = acc_type_of(router_logits.scalar_type());
  std::optional<Tensor> bias;
  if (logit_bias.has_value() && logit_bias->defined()) {
    MOE_CHECK_VALUE(all_finite(*logit_bias), "logit_bias contains non-finite values (NaN or Inf)");
    bias = aten::contiguous(aten::to(*logit_bias, acc));
    MOE_CHECK_VALUE(all_finite(*bias), "logit_bias holds values too large for ", acc,
                    ", the routing dtype of ", router_logits.scalar_type(), " logits");
  }
  const Tensor logits = aten::contiguous(router_logits);
  const Device device = logits.device();
  Tensor probs = aten::empty({T, M}, acc, device);
  Tensor weights = aten::empty({T, top_k}, acc, device);
  Tensor experts = aten::empty({T, top_k}, kLong, device);
  std::atomic<bool> finite{true};

  dispatch_floating(logits.scalar_type(), "route_cpu", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* L = static_cast<const scalar_t*>(logits.const_data_ptr());
    const acc_t* b = bias ? bias->const_data_ptr<acc_t>() : nullptr;
    acc_t* p = probs.mutable_data_ptr<acc_t>();
    acc_t* w = weights.mutable_data_ptr<acc_t>();
    int64_t* e = experts.mutable_data_ptr<int64_t>();
    const acc_t inv_tau = acc_t(1.0 / temperature);
    torch::stable::parallel_for(0, T, kTokenGrain, [&](int64_t t0, int64_t t1) {
      std::vector<int64_t> index_buffer;
      for (int64_t t = t0; t < t1; ++t) {
        if (!route_row<scalar_t, acc_t>(L + t * M, b, M, top_k, inv_tau, normalize_weights,
                                         p + t * M, w + t * top_k, e + t * top_k, index_buffer)) {
          finite = false;
          return;
        }
      }
    });
  });
  MOE_CHECK_VALUE(finite.load(), "router_logits contains non-finite values (NaN or Inf)");

  Tensor counts = aten::zeros({M}, kLong, device);
  int64_t* c = counts.mutable_data_ptr<int64_t>();
  const int64_t* e = experts.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < T * top_k; ++i) ++c[e[i]];
  return {probs, weights, experts, counts};
}

// grad_logits = softmax backward of g_p, where g_p = grad_probs plus what flows from the
// weights: w_k = p[e_k] / S with S = sum_k p[e_k], so dS-terms give
// g_p[e_k] += (gw_k - sum_j gw_j w_j) / S (and just gw_k without normalisation).
template <typename acc_t>
void route_backward_rows(const acc_t* grad_probs, const acc_t* grad_w, const acc_t* probs,
                         const acc_t* w, const int64_t* experts, int64_t t0, int64_t t1,
                         int64_t M, int64_t K, acc_t inv_tau, bool normalize, acc_t* out) {
  for (int64_t t = t0; t < t1; ++t) {
    const acc_t* p = probs + t * M;
    acc_t* g = out + t * M;
    if (grad_probs) {
      std::copy(grad_probs + t * M, grad_probs + (t + 1) * M, g);
    } else {
      std::fill(g, g + M, acc_t(0));
    }
    const acc_t* gw = grad_w + t * K;
    const int64_t* e = experts + t * K;
    if (normalize) {
      acc_t S = 0, dot = 0;
      for (int64_t k = 0; k < K; ++k) {
        S += p[e[k]];
        dot += gw[k] * w[t * K + k];
      }
      for (int64_t k = 0; k < K; ++k) g[e[k]] += (gw[k] - dot) / S;
    } else {
      for (int64_t k = 0; k < K; ++k) g[e[k]] += gw[k];
    }
    acc_t pg = 0;
    for (int64_t j = 0; j < M; ++j) pg += p[j] * g[j];
    for (int64_t j = 0; j < M; ++j) g[j] = p[j] * (g[j] - pg) * inv_tau;
  }
}

Tensor route_backward_cpu(const std::optional<Tensor>& grad_probs, const Tensor& grad_weights,
                          const Tensor& probs, const Tensor& weights, const Tensor& experts,
                          double temperature, bool normalize_weights) {
  check_route_backward_args(grad_probs, grad_weights, probs, weights, experts, temperature);
  const int64_t T = probs.size(0), M = probs.size(1), K = experts.size(1);
  const ScalarType acc = probs.scalar_type();
  std::optional<Tensor> gp;
  if (grad_probs.has_value() && grad_probs->defined())
    gp = aten::contiguous(aten::to(*grad_probs, acc));
  const Tensor p = aten::contiguous(probs), w = aten::contiguous(aten::to(weights, acc)),
               gw = aten::contiguous(aten::to(grad_weights, acc)), e = aten::contiguous(experts);
  const int64_t* ids = e.const_data_ptr<int64_t>();
  const int64_t bad = first_bad_expert_id(ids, e.numel(), M);
  MOE_CHECK_VALUE(bad < 0, "experts holds id ", bad < 0 ? 0 : ids[bad], " outside [0, ", M, ")");
  Tensor out = aten::empty({T, M}, acc, p.device());
  dispatch_floating(acc, "route_backward_cpu", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* gpp = gp ? gp->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t *gwp = gw.const_data_ptr<scalar_t>(), *pp = p.const_data_ptr<scalar_t>(),
                   *wp = w.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    torch::stable::parallel_for(0, T, kTokenGrain, [&](int64_t t0, int64_t t1) {
      route_backward_rows<scalar_t>(gpp, gwp, pp, wp, ids, t0, t1, M, K,
                                    scalar_t(1.0 / temperature), normalize_weights, op);
    });
  }, /*low_precision=*/false);
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace moe_ext

STABLE_TORCH_LIBRARY_IMPL(moe_ext, CPU, m) {
  m.impl("route", TORCH_BOX(&moe_ext::cpu::route_cpu));
  m.impl("route_backward", TORCH_BOX(&moe_ext::cpu::route_backward_cpu));
}
