// Input checks shared by the CPU and CUDA kernels. Each message names the argument.
// Shape and value errors raise ValueError, dtype and device errors RuntimeError.
#pragma once
#include <ATen/ATen.h>

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

}  // namespace moe_ext
