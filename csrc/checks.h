// Input checks shared by the CPU and CUDA kernels. Each message names the argument.
// Shape and value errors raise ValueError, dtype and device errors RuntimeError.
#pragma once
#include <ATen/ATen.h>

#include <cmath>

namespace moe_ext {

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must be a ", dim, "-D tensor, got shape ", t.sizes());
}

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble ||
                  t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
              name, " must be float64, float32, bfloat16 or float16, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device());
}

// Accumulation dtype: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_routing(const at::Tensor& weights, const at::Tensor& experts, int64_t T,
                          const at::Tensor& x, const char* x_name) {
  check_dim(weights, 2, "weights");
  check_dim(experts, 2, "experts");
  TORCH_CHECK_VALUE(weights.sizes() == experts.sizes(), "weights shape ", weights.sizes(),
                    " must equal experts shape ", experts.sizes());
  TORCH_CHECK_VALUE(weights.size(0) == T, "weights has ", weights.size(0), " rows but ", x_name,
                    " has ", T, " tokens");
  TORCH_CHECK(experts.scalar_type() == at::kLong, "experts must be int64, got ",
              experts.scalar_type());
  TORCH_CHECK(weights.scalar_type() == acc_type_of(x.scalar_type()), "weights must be ",
              acc_type_of(x.scalar_type()), " for ", x_name, " of dtype ", x.scalar_type(),
              ", got ", weights.scalar_type());
  check_same_device(weights, x, "weights", x_name);
  check_same_device(experts, x, "experts", x_name);
}

// x (T, D), lora_A (E, R, D), lora_B (E, O, R).
inline void check_lora(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B) {
  check_dim(x, 2, "x");
  check_dim(A, 3, "lora_A");
  check_dim(B, 3, "lora_B");
  check_float(x, "x");
  TORCH_CHECK(A.scalar_type() == x.scalar_type(), "lora_A dtype ", A.scalar_type(),
              " must equal x dtype ", x.scalar_type());
  TORCH_CHECK(B.scalar_type() == x.scalar_type(), "lora_B dtype ", B.scalar_type(),
              " must equal x dtype ", x.scalar_type());
  check_same_device(A, x, "lora_A", "x");
  check_same_device(B, x, "lora_B", "x");
  TORCH_CHECK_VALUE(A.size(2) == x.size(1), "lora_A has D=", A.size(2), " but x has D=",
                    x.size(1));
  TORCH_CHECK_VALUE(B.size(0) == A.size(0), "lora_B has E=", B.size(0), " but lora_A has E=",
                    A.size(0));
  TORCH_CHECK_VALUE(B.size(2) == A.size(1), "lora_B has R=", B.size(2), " but lora_A has R=",
                    A.size(1));
  TORCH_CHECK_VALUE(A.size(0) >= 1 && A.size(1) >= 1, "lora_A needs E >= 1 and R >= 1, got shape ",
                    A.sizes());
}

// route: logits (T, M) float, 1 <= top_k <= M, finite temperature > 0, bias (M,) on the
// logits' device. Value checks on the data (non-finite logits) are the kernels' business.
inline void check_route_args(const at::Tensor& logits, const c10::optional<at::Tensor>& bias,
                             int64_t top_k, double temperature) {
  check_dim(logits, 2, "router_logits");
  check_float(logits, "router_logits");
  const int64_t M = logits.size(1);
  TORCH_CHECK_VALUE(M >= 1, "router_logits needs at least one expert column, got shape ",
                    logits.sizes());
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= M, "top_k must be in [1, ", M,
                    "] (the number of experts incl. null experts), got ", top_k);
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature),
                    "temperature must be a positive finite number, got ", temperature);
  if (bias.has_value() && bias->defined()) {
    check_dim(*bias, 1, "logit_bias");
    TORCH_CHECK_VALUE(bias->size(0) == M, "logit_bias must have shape (", M, ",), got ",
                      bias->sizes());
    check_same_device(*bias, logits, "logit_bias", "router_logits");
  }
}

inline void check_route_backward_args(const c10::optional<at::Tensor>& grad_probs,
                                      const at::Tensor& grad_weights, const at::Tensor& probs,
                                      const at::Tensor& weights, const at::Tensor& experts,
                                      double temperature) {
  check_dim(probs, 2, "probs");
  TORCH_CHECK(probs.scalar_type() == at::kFloat || probs.scalar_type() == at::kDouble,
              "probs must be float32 or float64, got ", probs.scalar_type());
  TORCH_CHECK_VALUE(temperature > 0, "temperature must be positive, got ", temperature);
  check_dim(experts, 2, "experts");
  TORCH_CHECK_VALUE(experts.size(0) == probs.size(0), "experts must have ", probs.size(0),
                    " rows, got ", experts.size(0));
  TORCH_CHECK_VALUE(grad_weights.sizes() == experts.sizes(), "grad_weights shape ",
                    grad_weights.sizes(), " must equal experts shape ", experts.sizes());
  TORCH_CHECK_VALUE(weights.sizes() == experts.sizes(), "weights shape ", weights.sizes(),
                    " must equal experts shape ", experts.sizes());
  TORCH_CHECK(experts.scalar_type() == at::kLong, "experts must be int64");
  if (grad_probs.has_value() && grad_probs->defined()) {
    TORCH_CHECK_VALUE(grad_probs->sizes() == probs.sizes(), "grad_probs shape ",
                      grad_probs->sizes(), " must equal probs shape ", probs.sizes());
    check_same_device(*grad_probs, probs, "grad_probs", "probs");
  }
  check_same_device(grad_weights, probs, "grad_weights", "probs");
  check_same_device(weights, probs, "weights", "probs");
  check_same_device(experts, probs, "experts", "probs");
}

inline void check_align_args(const at::Tensor& experts, int64_t num_bins) {
  check_dim(experts, 2, "experts");
  TORCH_CHECK(experts.scalar_type() == at::kLong, "experts must be int64, got ",
              experts.scalar_type());
  TORCH_CHECK_VALUE(num_bins >= 1, "num_bins must be >= 1, got ", num_bins);
}

// lora_backward's extra tensors against x (T, D), lora_A (E, R, D), lora_B (E, O, R).
inline void check_lora_backward_args(const at::Tensor& grad_y, const at::Tensor& x,
                                     const at::Tensor& A, const at::Tensor& B,
                                     const at::Tensor& experts, const at::Tensor& order,
                                     const at::Tensor& offsets, const at::Tensor& h,
                                     int64_t num_null_experts) {
  const int64_t T = x.size(0), E = A.size(0), R = A.size(1), O = B.size(1), K = experts.size(1);
  TORCH_CHECK_VALUE(num_null_experts >= 0, "num_null_experts must be >= 0, got ", num_null_experts);
  TORCH_CHECK_VALUE(grad_y.dim() == 2 && grad_y.size(0) == T && grad_y.size(1) == O,
                    "grad_y must have shape (", T, ", ", O, "), got ", grad_y.sizes());
  TORCH_CHECK_VALUE(h.dim() == 2 && h.size(0) == T * K && h.size(1) == R, "h must have shape (",
                    T * K, ", ", R, "), got ", h.sizes());
  TORCH_CHECK_VALUE(order.dim() == 1 && order.size(0) == T * K, "order must have shape (", T * K,
                    ",), got ", order.sizes());
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) == E + num_null_experts + 1,
                    "offsets must have shape (", E + num_null_experts + 1, ",), got ",
                    offsets.sizes());
  TORCH_CHECK(order.scalar_type() == at::kLong && offsets.scalar_type() == at::kLong,
              "order and offsets must be int64, got ", order.scalar_type(), " and ",
              offsets.scalar_type());
  check_same_device(grad_y, x, "grad_y", "x");
  check_same_device(h, x, "h", "x");
  check_same_device(order, x, "order", "x");
  check_same_device(offsets, x, "offsets", "x");
}

// gate_dense: h_all (T, E*R) float, weights/experts (T, K); grad (if given) shaped like h_all.
inline void check_gate_dense_args(const at::Tensor& h_all, const at::Tensor& weights,
                                  const at::Tensor& experts, int64_t E,
                                  const at::Tensor* grad_gated = nullptr) {
  check_dim(h_all, 2, "h_all");
  check_float(h_all, "h_all");
  check_routing(weights, experts, h_all.size(0), h_all, "h_all");
  TORCH_CHECK_VALUE(E >= 1 && h_all.size(1) % E == 0, "h_all width ", h_all.size(1),
                    " must be a multiple of num_experts=", E);
  if (grad_gated) {
    TORCH_CHECK_VALUE(grad_gated->sizes() == h_all.sizes(), "grad_gated shape ",
                      grad_gated->sizes(), " must equal h_all shape ", h_all.sizes());
    check_same_device(*grad_gated, h_all, "grad_gated", "h_all");
  }
}

}  // namespace moe_ext
