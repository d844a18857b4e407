// CUDA ops of routing (route, route_backward): checks (csrc/checks.h), allocation on the
// current stream, and the launches of route.cu. No host synchronisation unless
// MOE_EXT_DEBUG=1.
#include <torch/library.h>

#include "ops_common.h"

namespace moe_ext {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_cuda(
    const at::Tensor& router_logits, const c10::optional<at::Tensor>& logit_bias, int64_t top_k,
    double temperature, bool normalize_weights) {
  check_route_args(router_logits, logit_bias, top_k, temperature);
  const c10::cuda::CUDAGuard guard(router_logits.device());
  const int64_t T = router_logits.size(0), M = router_logits.size(1);
  check_int32_range(M, "the number of experts");
  const auto acc = acc_type_of(router_logits.scalar_type());
  const at::Tensor logits = router_logits.contiguous();
  at::Tensor bias;
  if (logit_bias.has_value() && logit_bias->defined()) bias = logit_bias->to(acc).contiguous();
  if (debug_checks()) {
    TORCH_CHECK_VALUE(at::isfinite(logits).all().item<bool>(),
                      "router_logits contains non-finite values (NaN or Inf)");
    TORCH_CHECK_VALUE(!bias.defined() || at::isfinite(bias).all().item<bool>(),
                      "logit_bias contains non-finite values (NaN or Inf)");
  }
  auto fopts = logits.options().dtype(acc);
  at::Tensor probs = at::empty({T, M}, fopts);
  at::Tensor weights = at::empty({T, top_k}, fopts);
  at::Tensor experts = at::empty({T, top_k}, logits.options().dtype(at::kLong));
  at::Tensor counts = at::zeros({M}, logits.options().dtype(at::kLong));
  C10_CUDA_CHECK(launch_route(dtype_of(logits.scalar_type()), logits.data_ptr(),
                              bias.defined() ? bias.data_ptr() : nullptr, T, M, top_k,
                              1.0 / temperature, normalize_weights, probs.data_ptr(),
                              weights.data_ptr(), experts.data_ptr<int64_t>(),
                              counts.data_ptr<int64_t>(), current_stream()));
  return {probs, weights, experts, counts};
}

at::Tensor route_backward_cuda(const c10::optional<at::Tensor>& grad_probs,
                               const at::Tensor& grad_weights, const at::Tensor& probs,
                               const at::Tensor& weights, const at::Tensor& experts,
                               double temperature, bool normalize_weights) {
  check_route_backward_args(grad_probs, grad_weights, probs, weights, experts, temperature);
  const c10::cuda::CUDAGuard guard(probs.device());
  const int64_t T = probs.size(0), M = probs.size(1), K = experts.size(1);
  check_int32_range(M, "the number of experts");
  check_int32_range(K, "top_k");
  const auto acc = probs.scalar_type();
  at::Tensor gp;
  if (grad_probs.has_value() && grad_probs->defined()) gp = grad_probs->to(acc).contiguous();
  const at::Tensor p = probs.contiguous(), w = weights.to(acc).contiguous(),
                   gw = grad_weights.to(acc).contiguous(), e = experts.contiguous();
  debug_check_ids(e, M, "experts");
  at::Tensor out = at::empty({T, M}, p.options());
  C10_CUDA_CHECK(launch_route_backward(dtype_of(acc), gp.defined() ? gp.data_ptr() : nullptr,
                                       gw.data_ptr(), p.data_ptr(), w.data_ptr(),
                                       e.data_ptr<int64_t>(), T, M, K, 1.0 / temperature,
                                       normalize_weights, out.data_ptr(), current_stream()));
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace moe_ext

TORCH_LIBRARY_IMPL(moe_ext, CUDA, m) {
  m.impl("route", &moe_ext::cuda::route_cuda);
  m.impl("route_backward", &moe_ext::cuda::route_backward_cuda);
}
