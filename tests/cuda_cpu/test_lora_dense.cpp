// The dense-gated strategy's CUDA kernels (csrc/cuda/lora_dense.cu) on the CPU execution
// model against the float64 reference:
//   - the fused tensor-core forward and backward (bf16 / fp16): y, h_all, dx, dw, dA, dB at
//     edge shapes (T not a multiple of the 64-token block, E*R from 8 to 256, the widest, D
//     and O past several pipeline stages, K = 1 and K > 1, null experts, repeated ids, two
//     token splits of the weight gradient), and on the same cases the lora_dense_expand
//     variants of both kernels (no shrink, no dx / dA) from the forward's h_all;
//   - the generic path's gate kernels (every dtype), the cases of tests/ops/test_lora_dense.py
//     that the model can run (the cuBLAS GEMMs around them it cannot).
#include <cmath>
#include <string>

#include "harness.h"
#include "ops.h"
#include "reference.h"

namespace cuda_cpu {
namespace {

using Edit = std::vector<int64_t> (*)(std::vector<int64_t>);

void check_fused(DType t, const LoraShape& s, Edit edit = nullptr) {
  const ref::Routing r = ref::route(randn(s.T * (s.E + s.N), 11), {}, s.T, s.E + s.N, s.K, 1.0, true);
  const std::vector<int64_t> experts = edit ? edit(r.experts) : r.experts;
  const auto w = rounded(r.weights, acc_of(t));
  const auto x = rounded(randn(s.T * s.D, 12), t);
  const auto A = rounded(randn(s.E * s.R * s.D, 13, 1.0 / std::sqrt(double(s.D))), t);
  const auto B = rounded(randn(s.E * s.O * s.R, 14, 1.0 / std::sqrt(double(s.R))), t);
  const Buffer Bd = to_device(B, t), wd = to_device(w, acc_of(t)), ids = ints_to_device(experts);
  const DenseForward f = lora_dense_fused_forward(t, s, to_device(x, t), to_device(A, t), Bd, wd, ids);
  const ref::Lora rs{s.T, s.D, s.O, s.E, s.R, s.K, s.scaling};
  std::vector<double> y, h;
  ref::lora_forward(rs, x, A, B, w, experts, y, h);
  // gated h is rounded to the dtype once before the expand (the tensor cores' A operand)
  expect_close("y", to_host(f.y, t, s.T * s.O), y, 2 * tolerance(t));
  const auto h_all = to_host(f.h_all, t, s.T * s.E * s.R);
  expect_close("h_all", h_all, ref::shrink_all(x, A, s.T, s.D, s.E, s.R), tolerance(t));

  // Backward from the kernel's own h_all (the op's contract), against the per-pair
  // reference fed the same h: h[p] = h_all[t, e R : (e + 1) R] for LoRA pairs.
  const auto dy = rounded(randn(s.T * s.O, 15), t);
  const Buffer dyd = to_device(dy, t);
  const DenseBackward g =
      lora_dense_fused_backward(t, s, dyd, to_device(x, t), to_device(A, t), Bd, f.h_all, wd, ids);
  std::vector<double> hp(s.T * s.K * s.R, 0.0);
  for (int64_t p = 0; p < s.T * s.K; ++p)
    if (ref::is_lora(experts[p], s.E))
      for (int64_t r = 0; r < s.R; ++r)
        hp[p * s.R + r] = h_all[(p / s.K) * s.E * s.R + experts[p] * s.R + r];
  const ref::LoraGrads want = ref::lora_backward(rs, dy, x, A, B, w, experts, hp);
  // dh and gated are rounded once to the dtype before their second GEMM
  expect_close("dx", to_host(g.dx, t, s.T * s.D), want.dx, 2 * tolerance(t));
  expect_close("dw", to_host(g.dw, acc_of(t), s.T * s.K), want.dw, tolerance(t));
  expect_close("dA", to_host(g.dA, t, s.E * s.R * s.D), want.dA, 2 * tolerance(t));
  expect_close("dB", to_host(g.dB, t, s.E * s.O * s.R), want.dB, 2 * tolerance(t));

  // lora_dense_expand's kernels from the same h_all (MoLoRALinear's router fusion): y again,
  // and grad_h_all (rounded once, with the scaling), dw and dB as above.
  std::vector<double> y_expand, dh_all;
  ref::dense_expand(rs, h_all, B, w, experts, dy, y_expand, dh_all);
  const Buffer ye = lora_dense_expand_forward(t, s, f.h_all, Bd, wd, ids);
  expect_close("expand y", to_host(ye, t, s.T * s.O), y_expand, 2 * tolerance(t));
  const DenseExpandBackward ge = lora_dense_expand_backward(t, s, dyd, f.h_all, Bd, wd, ids);
  expect_close("expand grad_h_all", to_host(ge.dh_all, t, s.T * s.E * s.R), dh_all, tolerance(t));
  expect_close("expand dw", to_host(ge.dw, acc_of(t), s.T * s.K), want.dw, tolerance(t));
  expect_close("expand dB", to_host(ge.dB, t, s.E * s.O * s.R), want.dB, 2 * tolerance(t));
}

std::string name(DType t, const LoraShape& s, const char* why) {
  return std::string("lora_dense/fused ") + dtype_name(t) + " T" + std::to_string(s.T) + " D" +
         std::to_string(s.D) + " O" + std::to_string(s.O) + " E" + std::to_string(s.E) + " R" +
         std::to_string(s.R) + " N" + std::to_string(s.N) + " K" + std::to_string(s.K) + " (" +
         why + ")";
}

struct Shape {
  LoraShape s;
  const char* why;
};
// {T, D, O, E, R, N, K, scaling}
const Shape kFused[] = {
    {{1, 8, 8, 1, 8, 0, 1, 0.8}, "T = 1, E*R = 8 padded to 16, K = 1"},
    {{70, 40, 24, 2, 8, 1, 2, 0.8}, "T past one block, null expert, E*R = 16"},
    {{65, 24, 72, 3, 8, 0, 2, 0.8}, "E*R = 24 padded to 32, O past one stage"},
    {{67, 72, 16, 4, 16, 2, 3, 0.8}, "E*R = 64, D past two stages, null experts"},
    {{20, 16, 8, 8, 16, 0, 8, 0.8}, "E*R = 128, K = E"},
    {{17, 16, 16, 16, 16, 1, 5, 0.8}, "E*R = 256, the widest"},
    {{2100, 8, 8, 1, 8, 0, 1, 0.8}, "T = 2100: two token splits of the weight gradient"},
};

const bool kRegistered = [] {
  for (DType t : {DType::kBFloat16, DType::kFloat16})
    for (const Shape& sh : kFused) {
      if (sh.s.T > 1024 && t == DType::kFloat16) continue;  // 8 s in the model: bf16 only
      const bool tsan = t == DType::kBFloat16 && sh.s.T == 70;
      Register(name(t, sh.s, sh.why), tsan ? "tsan" : "", [t, sh] { check_fused(t, sh.s); });
    }
  return true;
}();

CUDA_CPU_CASE("lora_dense/fused repeated ids sum, bad ids add nothing", "", [] {
  check_fused(DType::kBFloat16, {9, 16, 16, 4, 8, 1, 3, 0.5}, [](std::vector<int64_t> e) {
    e[0] = e[1];  // token 0 names one expert twice: its weights add
    e[4] = 9;     // outside [0, E + N): adds nothing, as a null expert
    e[5] = -2;
    return e;
  });
});

CUDA_CPU_CASE("lora_dense/fused only null experts give zero", "", [] {
  check_fused(DType::kFloat16, {5, 8, 8, 2, 8, 2, 2, 0.5}, [](std::vector<int64_t> e) {
    for (auto& id : e) id = 2 + (&id - e.data()) % 2;
    return e;
  });
});

CUDA_CPU_CASE("lora_dense/fused refuses what it cannot take", "", [] {
  using moe_ext::cuda::dense_fused_supported;
  check(!dense_fused_supported(DType::kFloat32, 8, 8, 8, 2, 8, 2), "float32");
  check(!dense_fused_supported(DType::kBFloat16, 8, 8, 8, 40, 8, 2), "E*R > 256");
  check(!dense_fused_supported(DType::kBFloat16, 8, 8, 8, 2, 5, 2), "R % 8");
  check(!dense_fused_supported(DType::kBFloat16, 8, 12, 8, 2, 8, 2), "D % 8");
  check(!dense_fused_supported(DType::kBFloat16, 8, 8, 12, 2, 8, 2), "O % 8");
  check(!dense_fused_supported(DType::kBFloat16, 0, 8, 8, 2, 8, 2), "T = 0");
  check(!dense_fused_supported(DType::kBFloat16, 8, 8, 0, 2, 8, 2), "O = 0");
  using moe_ext::cuda::dense_expand_supported;  // the expand alone: the same without D
  check(dense_expand_supported(DType::kBFloat16, 8, 8, 2, 8, 2), "expand");
  check(!dense_expand_supported(DType::kFloat32, 8, 8, 2, 8, 2), "expand float32");
  check(!dense_expand_supported(DType::kBFloat16, 8, 8, 40, 8, 2), "expand E*R > 256");
  check(!dense_expand_supported(DType::kBFloat16, 8, 8, 2, int64_t(1) << 62, 2), "huge R");
  // width 256 needs more than the 99 KB per block of sm_86 / sm_89 (the host then takes the
  // cuBLAS path), width 128 fits there
  check(moe_ext::cuda::dense_fused_shared_bytes(256) > 101376, "width 256 over 99 KB");
  check(moe_ext::cuda::dense_fused_shared_bytes(128) <= 101376, "width 128 within 99 KB");
  check(dense_fused_supported(DType::kBFloat16, 8, 8, 8, 32, 8, 2), "E*R = 256");
});

// The generic path's gate kernels: gated = gate(h_all), dh = gate(d_gated), dw.
void check_gate(DType t, int64_t T, int64_t E, int64_t R, int64_t N, int64_t K, Edit edit) {
  const double s = 0.9;
  const DType acc = acc_of(t);
  const ref::Routing r = ref::route(randn(T * (E + N), 7), {}, T, E + N, K, 1.0, true);
  const std::vector<int64_t> experts = edit ? edit(r.experts) : r.experts;
  const auto w = rounded(r.weights, acc);
  const auto h_all = rounded(randn(T * E * R, 8), t), grad = rounded(randn(T * E * R, 9), t);
  const Buffer ids = ints_to_device(experts), wb = to_device(w, acc), hb = to_device(h_all, t);
  const Buffer gb = to_device(grad, t);
  expect_close("gated", to_host(dense_gate(t, hb, wb, ids, T, E, R, K, s), t, T * E * R),
               ref::dense_gate(h_all, w, experts, T, E, R, K, s), tolerance(t));
  expect_close("grad_h_all", to_host(dense_gate(t, gb, wb, ids, T, E, R, K, s), t, T * E * R),
               ref::dense_gate(grad, w, experts, T, E, R, K, s), tolerance(t));
  expect_close("grad_w", to_host(dense_gate_grad_w(t, gb, hb, ids, T, E, R, K, s), acc, T * K),
               ref::dense_gate_grad_w(grad, h_all, experts, T, E, R, K, s), tolerance(t));
}

const bool kRegisteredGate = [] {
  for (DType t : {DType::kFloat64, DType::kFloat32, DType::kFloat16, DType::kBFloat16})
    Register(std::string("lora_dense/gate ") + dtype_name(t) + " T90 E5 R6 N1 K3",
             t == DType::kFloat32 ? "tsan" : "", [t] { check_gate(t, 90, 5, 6, 1, 3, nullptr); });
  return true;
}();

CUDA_CPU_CASE("lora_dense/gate T=0", "", [] { check_gate(DType::kFloat32, 0, 3, 2, 0, 2, nullptr); });

CUDA_CPU_CASE("lora_dense/gate bad ids add nothing", "", [] {
  check_gate(DType::kFloat64, 30, 3, 4, 1, 2, [](std::vector<int64_t> e) {
    e[0] = 9;
    e[5] = -2;
    return e;
  });
});

}  // namespace
}  // namespace cuda_cpu
