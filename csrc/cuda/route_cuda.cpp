// CUDA ops of routing (route, route_backward): checks (csrc/checks.h), allocation on the
// current stream, and the launches of route.cu. No host synchronisation unless
// MOE_EXT_DEBUG=1.
#include "ops_common.h"

namespace moe_ext {
namespace cuda {
namespace {

std::tuple<Tensor, Tensor, Tensor, Tensor> route_cuda(const Tensor& router_logits,
                                                      const std::optional<Tensor>& logit_bias,
                                                      int64_t top_k, double temperature,
                                                      bool normalize_weights) {
  check_route_args(router_logits, logit_bias, top_k, temperature);
  const auto guard = device_guard(router_logits);
  const int64_t T = router_logits.size(0), M = router_logits.size(1);
  check_int32_range(M, "the number of experts");
  const ScalarType acc = acc_type_of(router_logits.scalar_type());
  const Tensor logits = aten::contiguous(router_logits);
  std::optional<Tensor> bias;
  if (logit_bias.has_value() && logit_bias->defined())
    bias = aten::contiguous(aten::to(*logit_bias, acc));
  debug_check_finite(logits, "router_logits");
  if (bias) debug_check_finite(*bias, "logit_bias");
  const Device device = logits.device();
  Tensor probs = aten::empty({T, M}, acc, device);
  Tensor weights = aten::empty({T, top_k}, acc, device);
  Tensor experts = aten::empty({T, top_k}, kLong, device);
  Tensor counts = aten::zeros({M}, kLong, device);
  MOE_CUDA_CHECK(launch_route(dtype_of(logits.scalar_type()), logits.const_data_ptr(),
                              bias ? bias->const_data_ptr() : nullptr, T, M, top_k,
                              1.0 / temperature, normalize_weights, probs.mutable_data_ptr(),
                              weights.mutable_data_ptr(), experts.mutable_data_ptr<int64_t>(),
                              counts.mutable_data_ptr<int64_t>(), current_stream()));
  return {probs, weights, experts, counts};
}

Tensor route_backward_cuda(const std::optional<Tensor>& grad_probs, const Tensor& grad_weights,
                           const Tensor& probs, const Tensor& weights, const Tensor& experts,
                           double temperature, bool normalize_weights) {
  check_route_backward_args(grad_probs, grad_weights, probs, weights, experts, temperature);
  const auto guard = device_guard(probs);
  const int64_t T = probs.size(0), M = probs.size(1), K = experts.size(1);
  check_int32_range(M, "the number of experts");
  check_int32_range(K, "top_k");
  const ScalarType acc = probs.scalar_type();
  std::optional<Tensor> gp;
  if (grad_probs.has_value() && grad_probs->defined())
    gp = aten::contiguous(aten::to(*grad_probs, acc));
  const Tensor p = aten::contiguous(probs), w = aten::contiguous(aten::to(weights, acc)),
               gw = aten::contiguous(aten::to(grad_weights, acc)), e = aten::contiguous(experts);
  debug_check_ids(e, M, "experts");
  Tensor out = aten::empty({T, M}, acc, p.device());
  MOE_CUDA_CHECK(launch_route_backward(
      dtype_of(acc), gp ? gp->const_data_ptr() : nullptr, gw.const_data_ptr(), p.const_data_ptr(),
      w.const_data_ptr(), e.const_data_ptr<int64_t>(), T, M, K, 1.0 / temperature,
      normalize_weights, out.mutable_data_ptr(), current_stream()));
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace moe_ext

STABLE_TORCH_LIBRARY_IMPL(moe_ext, CUDA, m) {
  m.impl("route", TORCH_BOX(&moe_ext::cuda::route_cuda));
  m.impl("route_backward", TORCH_BOX(&moe_ext::cuda::route_backward_cuda));
}
