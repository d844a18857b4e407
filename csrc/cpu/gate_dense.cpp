// CPU kernels for the dense-gated strategy's mask: gate_dense / gate_dense_backward.
// The strategy's two GEMMs (x A_all^T and gated B_all) are ATen's; see functional.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "simd.h"
#include "vec.h"

namespace moe_ext {
namespace cpu {
namespace {

// gated[t, e*R:(e+1)*R] = s * w[t,k] * h_all[t, e*R:(e+1)*R] for each chosen LoRA expert
// e = experts[t,k]; zero for experts not chosen (and nothing for null experts).
at::Tensor gate_dense_cpu(const at::Tensor& h_all_in, const at::Tensor& w_in,
                          const at::Tensor& experts_in, int64_t E, int64_t num_null_experts,
                          double scaling) {
  check_gate_dense_args(h_all_in, w_in, experts_in, E, num_null_experts, scaling);
  const at::Tensor h = h_all_in.contiguous(), w = w_in.contiguous(), ex = experts_in.contiguous();
  const int64_t T = h.size(0), ER = h.size(1), R = ER / E, K = ex.size(1);
  const int64_t bad = first_bad_expert_id(ex.data_ptr<int64_t>(), T * K, E + num_null_experts);
  TORCH_CHECK_VALUE(bad < 0, "experts holds id ", bad < 0 ? 0 : ex.data_ptr<int64_t>()[bad],
                    " outside [0, ", E + num_null_experts, ")");
  at::Tensor out = at::zeros_like(h);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "gate_dense_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    const scalar_t* hp = h.data_ptr<scalar_t>();
    const acc_t* wp = w.data_ptr<acc_t>();
    const int64_t* ep = ex.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        for (int64_t k = 0; k < K; ++k) {
          const int64_t e = ep[t * K + k];
          if (e >= E) continue;
          const acc_t g = static_cast<acc_t>(scaling) * wp[t * K + k];
          for (int64_t r = 0; r < R; ++r) {
            const int64_t i = t * ER + e * R + r;
            op[i] = static_cast<scalar_t>(static_cast<acc_t>(op[i]) + g * static_cast<acc_t>(hp[i]));  // sums repeated ids
          }
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gate_dense_backward_cpu(const at::Tensor& grad_in,
                                                           const at::Tensor& h_all_in,
                                                           const at::Tensor& w_in,
                                                           const at::Tensor& experts_in, int64_t E,
                                                           int64_t num_null_experts, double scaling) {
  check_gate_dense_args(h_all_in, w_in, experts_in, E, num_null_experts, scaling, &grad_in);
  const at::Tensor h = h_all_in.contiguous(), w = w_in.contiguous(), ex = experts_in.contiguous(),
                   g = grad_in.to(h.scalar_type()).contiguous();
  const int64_t T = h.size(0), ER = h.size(1), R = ER / E, K = ex.size(1);
  const int64_t bad = first_bad_expert_id(ex.data_ptr<int64_t>(), T * K, E + num_null_experts);
  TORCH_CHECK_VALUE(bad < 0, "experts holds id ", bad < 0 ? 0 : ex.data_ptr<int64_t>()[bad],
                    " outside [0, ", E + num_null_experts, ")");
  at::Tensor dh = at::zeros_like(h);
  at::Tensor dw = at::empty_like(w);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "gate_dense_backward_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    const scalar_t *hp = h.data_ptr<scalar_t>(), *gp = g.data_ptr<scalar_t>();
    const acc_t* wp = w.data_ptr<acc_t>();
    const int64_t* ep = ex.data_ptr<int64_t>();
    scalar_t* dhp = dh.data_ptr<scalar_t>();
    acc_t* dwp = dw.data_ptr<acc_t>();
    const acc_t s = static_cast<acc_t>(scaling);
    at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        for (int64_t k = 0; k < K; ++k) {
          const int64_t e = ep[t * K + k];
          if (e >= E) {
            dwp[t * K + k] = 0;
            continue;
          }
          const acc_t gate = s * wp[t * K + k];
          acc_t dot = 0;
          for (int64_t r = 0; r < R; ++r) {
            const int64_t i = t * ER + e * R + r;
            const acc_t gi = static_cast<acc_t>(gp[i]);
            dot += gi * static_cast<acc_t>(hp[i]);
            dhp[i] = static_cast<scalar_t>(static_cast<acc_t>(dhp[i]) + gate * gi);
          }
          dwp[t * K + k] = s * dot;
        }
      }
    });
  });
  return {dh, dw};
}

}  // namespace
}  // namespace cpu
}  // namespace moe_ext

TORCH_LIBRARY_IMPL(moe_ext, CPU, m) {
  m.impl("gate_dense", &moe_ext::cpu::gate_dense_cpu);
  m.impl("gate_dense_backward", &moe_ext::cpu::gate_dense_backward_cpu);
}
