// Input checks shared by the CPU and CUDA kernels. Each message names the argument.
// Shape and value errors raise ValueError, dtype and device errors RuntimeError.
#pragma once
#include "stable.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace moe_ext {

// Integer arguments are checked against these before any arithmetic or allocation uses them,
// so `E + num_null_experts`, `num_bins + 1` and the like cannot overflow, and a small input
// cannot ask for gigabytes.
constexpr int64_t kMaxExperts = (int64_t(1) << 31) - 1;  // M = E + N, expert ids fit in int32
constexpr int64_t kMaxBins = int64_t(1) << 24;           // align: offsets and counts per bin

inline void check_dim(const Tensor& t, int64_t dim, const char* name) {
  MOE_CHECK_VALUE(t.dim() == dim, name, " must be a ", dim, "-D tensor, got shape ", shape_of(t));
}

inline void check_float(const Tensor& t, const char* name) {
  MOE_CHECK(t.scalar_type() == kFloat || t.scalar_type() == kDouble ||
                  t.scalar_type() == kBFloat16 || t.scalar_type() == kHalf,
              name, " must be float64, float32, bfloat16 or float16, got ", t.scalar_type());
}

inline void check_same_device(const Tensor& t, const Tensor& ref, const char* name,
                              const char* ref_name) {
  MOE_CHECK(t.device() == ref.device(), name, " is on ", device_of(t), " but ", ref_name,
            " is on ", device_of(ref));
}

// The kernels multiply by scaling in the accumulation dtype: it must be finite there too
// (1e39 is finite in float64 but inf in float32, and inf * 0 would turn zero inputs into NaN).
inline void check_scaling(double scaling, ScalarType dtype) {
  const double largest = dtype == kDouble ? std::numeric_limits<double>::max()
                                          : std::numeric_limits<float>::max();
  MOE_CHECK_VALUE(std::isfinite(scaling) && std::fabs(scaling) <= largest,
                  "scaling must be a finite number in ", dtype == kDouble ? "float64" : "float32",
                  " (the accumulation dtype of ", dtype, " inputs), got ", scaling);
}

// 0 <= num_null_experts and M = E + N <= kMaxExperts (checked without forming E + N first).
inline void check_num_null_experts(int64_t num_null_experts, int64_t E) {
  MOE_CHECK_VALUE(E >= 1 && E <= kMaxExperts, "the number of LoRA experts E must be in [1, ",
                    kMaxExperts, "], got ", E);
  MOE_CHECK_VALUE(num_null_experts >= 0 && num_null_experts <= kMaxExperts - E,
                  "num_null_experts must be in [0, ", kMaxExperts - E, "] (E=", E,
                  " LoRA experts + num_null_experts <= ", kMaxExperts, "), got ", num_null_experts);
}

// Accumulation dtype: float64 for float64 inputs, float32 otherwise.
inline ScalarType acc_type_of(ScalarType t) {
  return t == kDouble ? kDouble : kFloat;
}

inline void check_routing(const Tensor& weights, const Tensor& experts, int64_t T,
                          const Tensor& x, const char* x_name) {
  check_dim(weights, 2, "weights");
  check_dim(experts, 2, "experts");
  MOE_CHECK_VALUE(same_shape(weights, experts), "weights shape ", shape_of(weights),
                    " must equal experts shape ", shape_of(experts));
  MOE_CHECK_VALUE(weights.size(0) == T, "weights has ", weights.size(0), " rows but ", x_name,
                    " has ", T, " tokens");
  MOE_CHECK(experts.scalar_type() == kLong, "experts must be int64, got ",
              experts.scalar_type());
  MOE_CHECK(weights.scalar_type() == acc_type_of(x.scalar_type()), "weights must be ",
              acc_type_of(x.scalar_type()), " for ", x_name, " of dtype ", x.scalar_type(),
              ", got ", weights.scalar_type());
  check_same_device(weights, x, "weights", x_name);
  check_same_device(experts, x, "experts", x_name);
}

// x (T, D), lora_A (E, R, D), lora_B (E, O, R).
inline void check_lora(const Tensor& x, const Tensor& A, const Tensor& B) {
  check_dim(x, 2, "x");
  check_dim(A, 3, "lora_A");
  check_dim(B, 3, "lora_B");
  check_float(x, "x");
  MOE_CHECK(A.scalar_type() == x.scalar_type(), "lora_A dtype ", A.scalar_type(),
              " must equal x dtype ", x.scalar_type());
  MOE_CHECK(B.scalar_type() == x.scalar_type(), "lora_B dtype ", B.scalar_type(),
              " must equal x dtype ", x.scalar_type());
  check_same_device(A, x, "lora_A", "x");
  check_same_device(B, x, "lora_B", "x");
  MOE_CHECK_VALUE(A.size(2) == x.size(1), "lora_A has D=", A.size(2), " but x has D=",
                    x.size(1));
  MOE_CHECK_VALUE(B.size(0) == A.size(0), "lora_B has E=", B.size(0), " but lora_A has E=",
                    A.size(0));
  MOE_CHECK_VALUE(B.size(2) == A.size(1), "lora_B has R=", B.size(2), " but lora_A has R=",
                    A.size(1));
  MOE_CHECK_VALUE(A.size(0) >= 1 && A.size(1) >= 1, "lora_A needs E >= 1 and R >= 1, got shape ",
                    shape_of(A));
}

// The router temperature tau: positive, finite, and 1 / tau finite in the accumulation
// dtype, so that no (logit difference) / tau and no softmax gradient / tau can be 0 * inf.
inline void check_temperature(double temperature, ScalarType acc) {
  const double largest = acc == kDouble ? std::numeric_limits<double>::max()
                                            : std::numeric_limits<float>::max();
  const bool ok = temperature > 0 && std::isfinite(temperature) && 1.0 / temperature <= largest;
  MOE_CHECK_VALUE(ok, "temperature must be a positive finite number whose inverse is finite in ",
                    acc, " (the routing dtype), i.e. at least ", 1.0 / largest, ", got ",
                    temperature);
}

// route: logits (T, M) float, 1 <= top_k <= M, finite temperature > 0, bias (M,) on the
// logits' device. Value checks on the data (non-finite logits) are the kernels' business.
inline void check_route_args(const Tensor& logits, const std::optional<Tensor>& bias,
                             int64_t top_k, double temperature) {
  check_dim(logits, 2, "router_logits");
  check_float(logits, "router_logits");
  const int64_t M = logits.size(1);
  MOE_CHECK_VALUE(M >= 1, "router_logits needs at least one expert column, got shape ",
                    shape_of(logits));
  MOE_CHECK_VALUE(top_k >= 1 && top_k <= M, "top_k must be in [1, ", M,
                    "] (the number of experts incl. null experts), got ", top_k);
  check_temperature(temperature, acc_type_of(logits.scalar_type()));
  if (bias.has_value() && bias->defined()) {
    check_dim(*bias, 1, "logit_bias");
    check_float(*bias, "logit_bias");
    MOE_CHECK_VALUE(bias->size(0) == M, "logit_bias must have shape (", M, ",), got ",
                      shape_of(*bias));
    check_same_device(*bias, logits, "logit_bias", "router_logits");
  }
}

inline void check_route_backward_args(const std::optional<Tensor>& grad_probs,
                                      const Tensor& grad_weights, const Tensor& probs,
                                      const Tensor& weights, const Tensor& experts,
                                      double temperature) {
  check_dim(probs, 2, "probs");
  MOE_CHECK(probs.scalar_type() == kFloat || probs.scalar_type() == kDouble,
              "probs must be float32 or float64, got ", probs.scalar_type());
  check_temperature(temperature, probs.scalar_type());
  check_dim(experts, 2, "experts");
  check_dim(grad_weights, 2, "grad_weights");
  check_float(grad_weights, "grad_weights");
  check_float(weights, "weights");
  MOE_CHECK_VALUE(experts.size(0) == probs.size(0), "experts must have ", probs.size(0),
                    " rows, got ", experts.size(0));
  MOE_CHECK_VALUE(same_shape(grad_weights, experts), "grad_weights shape ",
                    shape_of(grad_weights), " must equal experts shape ", shape_of(experts));
  MOE_CHECK_VALUE(same_shape(weights, experts), "weights shape ", shape_of(weights),
                    " must equal experts shape ", shape_of(experts));
  MOE_CHECK(experts.scalar_type() == kLong, "experts must be int64");
  if (grad_probs.has_value() && grad_probs->defined()) {
    MOE_CHECK_VALUE(same_shape(*grad_probs, probs), "grad_probs shape ",
                      shape_of(*grad_probs), " must equal probs shape ", shape_of(probs));
    check_float(*grad_probs, "grad_probs");
    check_same_device(*grad_probs, probs, "grad_probs", "probs");
  }
  check_same_device(grad_weights, probs, "grad_weights", "probs");
  check_same_device(weights, probs, "weights", "probs");
  check_same_device(experts, probs, "experts", "probs");
}

inline void check_align_args(const Tensor& experts, int64_t num_bins) {
  check_dim(experts, 2, "experts");
  MOE_CHECK(experts.scalar_type() == kLong, "experts must be int64, got ",
              experts.scalar_type());
  MOE_CHECK_VALUE(num_bins >= 1 && num_bins <= kMaxBins, "num_bins must be in [1, ", kMaxBins,
                    "], got ", num_bins);
}

// lora_forward: the x, lora_A, lora_B, routing, scaling and num_null_experts checks.
inline void check_lora_forward_args(const Tensor& x, const Tensor& A, const Tensor& B,
                                    const Tensor& weights, const Tensor& experts,
                                    double scaling, int64_t num_null_experts) {
  check_lora(x, A, B);
  check_routing(weights, experts, x.size(0), x, "x");
  check_scaling(scaling, x.scalar_type());
  check_num_null_experts(num_null_experts, A.size(0));
}

// lora_backward's extra tensors against x (T, D), lora_A (E, R, D), lora_B (E, O, R).
// order (P,) and offsets (E + 2,) are the alignment of the pairs with every null expert in
// one bin E: align(experts.clamp(max=E), E + 1), so nothing here grows with N.
inline void check_lora_backward_args(const Tensor& grad_y, const Tensor& x,
                                     const Tensor& A, const Tensor& B,
                                     const Tensor& weights, const Tensor& experts,
                                     const Tensor& order, const Tensor& offsets,
                                     const Tensor& h, double scaling,
                                     int64_t num_null_experts) {
  check_lora_forward_args(x, A, B, weights, experts, scaling, num_null_experts);
  const int64_t T = x.size(0), E = A.size(0), R = A.size(1), O = B.size(1), K = experts.size(1);
  MOE_CHECK_VALUE(grad_y.dim() == 2 && grad_y.size(0) == T && grad_y.size(1) == O,
                    "grad_y must have shape (", T, ", ", O, "), got ", shape_of(grad_y));
  check_float(grad_y, "grad_y");
  MOE_CHECK_VALUE(h.dim() == 2 && h.size(0) == T * K && h.size(1) == R, "h must have shape (",
                    T * K, ", ", R, "), got ", shape_of(h));
  check_float(h, "h");
  MOE_CHECK_VALUE(order.dim() == 1 && order.size(0) == T * K, "order must have shape (", T * K,
                    ",), got ", shape_of(order));
  MOE_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) == E + 2, "offsets must have shape (",
                    E + 2, ",) (E + 2: align(experts.clamp(max=E), E + 1) puts every null expert "
                    "in bin E), got ", shape_of(offsets));
  MOE_CHECK(order.scalar_type() == kLong, "order must be int64, got ", order.scalar_type());
  MOE_CHECK(offsets.scalar_type() == kLong, "offsets must be int64, got ",
              offsets.scalar_type());
  check_same_device(grad_y, x, "grad_y", "x");
  check_same_device(h, x, "h", "x");
  check_same_device(order, x, "order", "x");
  check_same_device(offsets, x, "offsets", "x");
}

// lora_dense_backward's extra tensors against x (T, D), lora_A (E, R, D), lora_B (E, O, R):
// grad_y (T, O) and h_all (T, E*R), the all-expert shrink x A_all^T that lora_dense_forward
// returned (any float dtype; the kernels read both in x's dtype).
inline void check_lora_dense_backward_args(const Tensor& grad_y, const Tensor& x,
                                           const Tensor& A, const Tensor& B,
                                           const Tensor& weights, const Tensor& experts,
                                           const Tensor& h_all, double scaling,
                                           int64_t num_null_experts) {
  check_lora_forward_args(x, A, B, weights, experts, scaling, num_null_experts);
  const int64_t T = x.size(0), E = A.size(0), R = A.size(1), O = B.size(1);
  MOE_CHECK_VALUE(grad_y.dim() == 2 && grad_y.size(0) == T && grad_y.size(1) == O,
                    "grad_y must have shape (", T, ", ", O, "), got ", shape_of(grad_y));
  check_float(grad_y, "grad_y");
  MOE_CHECK_VALUE(h_all.dim() == 2 && h_all.size(0) == T && h_all.size(1) == E * R,
                    "h_all must have shape (", T, ", ", E * R, ") (T, E*R), got ", shape_of(h_all));
  check_float(h_all, "h_all");
  check_same_device(grad_y, x, "grad_y", "x");
  check_same_device(h_all, x, "h_all", "x");
}

// lora_dense_expand: h_all (T, E*R) and lora_B (E, O, R) of one dtype, routing (T, K).
inline void check_lora_dense_expand_args(const Tensor& h_all, const Tensor& B,
                                         const Tensor& weights, const Tensor& experts,
                                         double scaling, int64_t num_null_experts) {
  check_dim(h_all, 2, "h_all");
  check_dim(B, 3, "lora_B");
  check_float(h_all, "h_all");
  MOE_CHECK(B.scalar_type() == h_all.scalar_type(), "lora_B dtype ", B.scalar_type(),
              " must equal h_all dtype ", h_all.scalar_type());
  check_same_device(B, h_all, "lora_B", "h_all");
  const int64_t E = B.size(0), R = B.size(2);
  MOE_CHECK_VALUE(E >= 1 && R >= 1, "lora_B needs E >= 1 and R >= 1, got shape ", shape_of(B));
  // E * R from lora_B without forming the product (an empty lora_B may have any E and R)
  MOE_CHECK_VALUE(h_all.size(1) % R == 0 && h_all.size(1) / R == E,
                    "h_all must have E*R columns (E=", E, ", R=", R, " from lora_B), got shape ",
                    shape_of(h_all));
  check_routing(weights, experts, h_all.size(0), h_all, "h_all");
  check_scaling(scaling, h_all.scalar_type());
  check_num_null_experts(num_null_experts, E);
}

inline void check_lora_dense_expand_backward_args(const Tensor& grad_y,
                                                  const Tensor& h_all, const Tensor& B,
                                                  const Tensor& weights,
                                                  const Tensor& experts, double scaling,
                                                  int64_t num_null_experts) {
  check_lora_dense_expand_args(h_all, B, weights, experts, scaling, num_null_experts);
  const int64_t T = h_all.size(0), O = B.size(1);
  MOE_CHECK_VALUE(grad_y.dim() == 2 && grad_y.size(0) == T && grad_y.size(1) == O,
                    "grad_y must have shape (", T, ", ", O, "), got ", shape_of(grad_y));
  check_float(grad_y, "grad_y");
  check_same_device(grad_y, h_all, "grad_y", "h_all");
}

// Host data check of the expert ids (the CPU kernels): experts (contiguous, on the CPU) holds
// only ids in [0, E + num_null_experts).
inline void check_expert_ids(const Tensor& experts, int64_t E, int64_t num_null_experts) {
  const int64_t* ids = experts.const_data_ptr<int64_t>();
  const int64_t M = E + num_null_experts;
  for (int64_t i = 0; i < experts.numel(); ++i)
    MOE_CHECK_VALUE(ids[i] >= 0 && ids[i] < M, "experts holds id ", ids[i], " outside [0, ", M,
                    ") (E=", E, " LoRA experts + num_null_experts=", num_null_experts, ")");
}

// Host data check of lora_backward's pair alignment (the CPU kernels always, the CUDA ones
// with MOE_EXT_DEBUG=1 on a host copy): ids in [0, M), offsets (E + 2,) from 0 to P never
// decreasing, order a permutation of [0, P) whose bin b holds exactly the pairs of expert b
// (bin E: the null experts). The weight gradients walk order[offsets[e]:offsets[e+1]], so
// anything else would read out of bounds or give wrong gradients.
inline void check_pair_alignment(const int64_t* experts, const int64_t* order,
                                 const int64_t* offsets, int64_t P, int64_t E, int64_t M) {
  for (int64_t p = 0; p < P; ++p)
    MOE_CHECK_VALUE(experts[p] >= 0 && experts[p] < M, "experts holds id ", experts[p],
                      " outside [0, ", M, ") (E=", E, " LoRA experts + num_null_experts=", M - E,
                      ")");
  MOE_CHECK_VALUE(offsets[0] == 0 && offsets[E + 1] == P, "offsets must start at 0 and end at P=",
                    P, ", got ", offsets[0], " and ", offsets[E + 1],
                    " (use align(experts.clamp(max=E), E + 1))");
  for (int64_t b = 0; b <= E; ++b)  // so that every offsets[b] lies in [0, P] below
    MOE_CHECK_VALUE(offsets[b] <= offsets[b + 1], "offsets must never decrease, got offsets[",
                      b, "]=", offsets[b], " > offsets[", b + 1, "]=", offsets[b + 1]);
  std::vector<bool> seen(P, false);
  for (int64_t b = 0; b <= E; ++b) {
    for (int64_t i = offsets[b]; i < offsets[b + 1]; ++i) {
      const int64_t p = order[i];
      MOE_CHECK_VALUE(p >= 0 && p < P, "order holds ", p, " outside [0, P=", P, ")");
      MOE_CHECK_VALUE(!seen[p], "order is not a permutation of [0, P): pair ", p, " appears twice");
      seen[p] = true;
      MOE_CHECK_VALUE(std::min(experts[p], E) == b, "order and offsets do not match experts: pair ",
                        p, " (expert ", experts[p], ") is in bin ", b,
                        " (use align(experts.clamp(max=E), E + 1))");
    }
  }
}

}  // namespace moe_ext
