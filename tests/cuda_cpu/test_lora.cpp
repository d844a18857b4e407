// lora_forward / lora_backward (csrc/cuda/lora.cu, the sequences of lora_cuda.cpp) on the
// CPU execution model against the float64 reference, with route and route_backward for
// the router gradient: the cases of tests/ops/test_lora.py and test_cuda_only.py at small
// sizes.
#include <cmath>
#include <cstring>
#include <functional>
#include <string>

#include "harness.h"
#include "ops.h"
#include "reference.h"

namespace cuda_cpu {
namespace {

struct Inputs {
  std::vector<double> x, logits, A, B, gy;
};

// make_inputs of tests/conftest.py: x (T, D), logits (T, E + N), A / sqrt(D), B / sqrt(R).
Inputs make_inputs(const LoraShape& s, uint64_t seed) {
  Inputs in{randn(s.T * s.D, seed), randn(s.T * (s.E + s.N), seed + 1),
            randn(s.E * s.R * s.D, seed + 2, 1.0 / std::sqrt(double(s.D))),
            randn(s.E * s.O * s.R, seed + 3, 1.0 / std::sqrt(double(s.R))), randn(s.T * s.O, seed + 4)};
  return in;
}

struct Result {
  std::vector<double> y, h, dx, dw, dA, dB;
};

// Forward and backward through the model, `experts` and `w` given (w in acc).
Result run_model(DType t, const LoraShape& s, const Inputs& in, const std::vector<double>& w,
                 const std::vector<int64_t>& experts) {
  const DType acc = acc_of(t);
  const Buffer x = to_device(in.x, t), A = to_device(in.A, t), B = to_device(in.B, t);
  const Buffer wb = to_device(w, acc), ids = ints_to_device(experts);
  const LoraForward f = lora_forward(t, s, x, A, B, wb, ids);
  const LoraBackward g = lora_backward(t, s, to_device(in.gy, t), x, A, B, wb, ids, f.a, f.h);
  const int64_t P = s.P();
  return {to_host(f.y, t, s.T * s.O), to_host(f.h, acc, P * s.R), to_host(g.dx, t, s.T * s.D),
          to_host(g.dw, acc, P), to_host(g.dA, t, s.E * s.R * s.D), to_host(g.dB, t, s.E * s.O * s.R)};
}

Result run_reference(DType t, const LoraShape& s, const Inputs& in, const std::vector<double>& w,
                     const std::vector<int64_t>& experts) {
  const ref::Lora r{s.T, s.D, s.O, s.E, s.R, s.K, s.scaling};
  const auto x = rounded(in.x, t), A = rounded(in.A, t), B = rounded(in.B, t);
  const auto wr = rounded(w, acc_of(t));
  Result out;
  ref::lora_forward(r, x, A, B, wr, experts, out.y, out.h);
  const ref::LoraGrads g = ref::lora_backward(r, rounded(in.gy, t), x, A, B, wr, experts, out.h);
  out.dx = g.dx, out.dw = g.dw, out.dA = g.dA, out.dB = g.dB;
  return out;
}

void expect_result(DType t, const Result& got, const Result& want) {
  const double tol = tolerance(t), acc_tol = tolerance(acc_of(t));
  expect_close("y", got.y, want.y, tol);
  expect_close("h", got.h, want.h, acc_tol);
  expect_close("dx", got.dx, want.dx, tol);
  expect_close("dw", got.dw, want.dw, acc_tol);
  expect_close("dA", got.dA, want.dA, tol);
  expect_close("dB", got.dB, want.dB, tol);
}

// Routes the logits (reference routing: the lora kernels' inputs), runs both, compares.
Result check_lora(DType t, const LoraShape& s, const Inputs& in) {
  const ref::Routing r = ref::route(in.logits, {}, s.T, s.E + s.N, s.K, 1.0, true);
  const Result got = run_model(t, s, in, r.weights, r.experts);
  expect_result(t, got, run_reference(t, s, in, r.weights, r.experts));
  return got;
}

// The whole float64 chain of functional.molora (sparse): route -> lora_forward ->
// lora_backward -> route_backward, down to the router logits.
void check_chain(const LoraShape& s, uint64_t seed) {
  const DType t = DType::kFloat64;
  const Inputs in = make_inputs(s, seed);
  const int64_t M = s.E + s.N;
  const RouteOut route_out = route(t, to_device(in.logits, t), Buffer(), s.T, M, s.K, 1.0, true);
  const auto w = to_host(route_out.weights, t, s.P());
  const auto experts = ints_to_host(route_out.experts, s.P());
  const Result got = run_model(t, s, in, w, experts);
  const ref::Routing r = ref::route(in.logits, {}, s.T, M, s.K, 1.0, true);
  expect_equal("experts", experts, r.experts);
  const Result want = run_reference(t, s, in, r.weights, r.experts);
  expect_result(t, got, want);
  const Buffer dlogits = route_backward(t, Buffer(), to_device(got.dw, t), route_out, s.T, M, s.K,
                                        1.0, true);
  // atol: with K = 1 the normalised weight is 1 and the true gradient 0 (both give ~1e-18)
  expect_close("dlogits", to_host(dlogits, t, s.T * M),
               ref::route_backward({}, want.dw, r, s.T, M, s.K, 1.0, true), 1e-11, 1e-14);
}

std::string shape_name(const LoraShape& s) {
  return "T" + std::to_string(s.T) + " D" + std::to_string(s.D) + " O" + std::to_string(s.O) +
         " E" + std::to_string(s.E) + " R" + std::to_string(s.R) + " N" + std::to_string(s.N) +
         " K" + std::to_string(s.K);
}

struct Shape {
  LoraShape s;
  const char* why;
  const char* tags;
};
// tests/ops/test_lora.py SHAPES, the larger ones made smaller (every block of 256 CUDA
// threads costs the model 256 host-thread wake-ups, every barrier as many again).
const Shape kShapes[] = {
    {{1, 8, 8, 4, 4, 0, 2, 0.8}, "T = 1", ""},
    {{37, 19, 23, 4, 5, 0, 2, 0.8}, "odd T, D, O and R", "tsan"},
    {{70, 33, 65, 3, 1, 0, 1, 0.8}, "R = 1, K = 1, tiles past 64 pairs", ""},
    {{70, 33, 130, 3, 1, 0, 1, 0.8}, "O past one column block (128)", "tsan"},
    {{45, 16, 16, 4, 8, 2, 6, 0.8}, "K = E + N with null experts", ""},
    {{64, 40, 24, 6, 16, 2, 3, 0.8}, "null experts among the top-K", ""},
    {{40, 72, 140, 6, 40, 2, 3, 0.8}, "R > 16: several rank chunks", ""},
    {{120, 100, 150, 3, 16, 0, 2, 0.8}, "two tiles per expert, D past 3 depth stages", ""},
    {{8, 12, 10, 20, 4, 0, 2, 0.8}, "E > T K: most experts never chosen", ""},
    {{20, 10, 9, 1, 3, 0, 1, 0.8}, "E = 1", ""},
    {{20, 10, 9, 1, 3, 1, 2, 0.8}, "E = 1 with a null expert, K = E + N", ""},
};

const bool kRegistered = [] {
  for (const Shape& sh : kShapes)
    Register("lora/float64 chain " + shape_name(sh.s) + " (" + sh.why + ")", sh.tags,
             [s = sh.s] { check_chain(s, 100 + s.T); });
  for (DType t : {DType::kFloat32, DType::kFloat16, DType::kBFloat16})
    Register(std::string("lora/") + dtype_name(t) + " T37 D19 O23 E4 R5 N1 K2",
             t == DType::kBFloat16 ? "tsan" : "", [t] {
               const LoraShape s{37, 19, 23, 4, 5, 1, 2, 0.8};
               check_lora(t, s, make_inputs(s, 5));
             });
  return true;
}();

// fp16 / bf16 run the shrinks on tensor cores (grouped_shrink_tc: mma, ldmatrix, cp.async):
// rows that are a multiple of 8 elements take the cp.async path, a last depth stage of 8
// columns (72 = 64 + 8), R = 20 two rank chunks, partial tiles, K = E + N with null experts;
// the expands likewise (mma over 16 n8 tiles of 128 columns, O = 136 two column blocks).
CUDA_CPU_CASE("lora/bf16 tensor cores, cp.async rows T70 D72 O40 E5 R20 N1 K2", "tsan", [] {
  const LoraShape s{70, 72, 40, 5, 20, 1, 2, 0.8};
  check_lora(DType::kBFloat16, s, make_inputs(s, 13));
});

CUDA_CPU_CASE("lora/f16 tensor cores, K = E + N T33 D32 O136 E3 R8 N1 K4", "", [] {
  const LoraShape s{33, 32, 136, 3, 8, 1, 4, 0.8};  // O: two column blocks
  check_lora(DType::kFloat16, s, make_inputs(s, 14));
});

CUDA_CPU_CASE("lora/T=0", "", [] {
  const LoraShape s{0, 8, 6, 3, 4, 0, 2, 0.8};
  const Result got = run_model(DType::kFloat32, s, make_inputs(s, 1), {}, {});
  expect_close("dA", got.dA, std::vector<double>(3 * 4 * 8, 0.0), 0);
  expect_close("dB", got.dB, std::vector<double>(3 * 6 * 4, 0.0), 0);
});

CUDA_CPU_CASE("lora/all tokens on one expert", "", [] {
  const LoraShape s{70, 20, 18, 5, 3, 0, 2, 0.8};  // 70 pairs on expert 2: two tiles
  Inputs in = make_inputs(s, 3);
  for (int64_t t = 0; t < s.T; ++t)
    for (int64_t e = 0; e < 5; ++e) in.logits[t * 5 + e] = e == 2 ? 30.0 : 0.0;
  check_lora(DType::kFloat64, s, in);
});

CUDA_CPU_CASE("lora/never chosen experts get zero gradient", "", [] {
  const LoraShape s{30, 10, 12, 6, 4, 0, 2, 1.0};
  Inputs in = make_inputs(s, 4);
  for (int64_t t = 0; t < s.T; ++t) in.logits[t * 6 + 4] = in.logits[t * 6 + 5] = -50.0;
  const Result got = check_lora(DType::kFloat64, s, in);
  for (int64_t i = 4 * s.R * s.D; i < s.E * s.R * s.D; ++i) check(got.dA[i] == 0, "dA of expert 4/5");
  for (int64_t i = 4 * s.O * s.R; i < s.E * s.O * s.R; ++i) check(got.dB[i] == 0, "dB of expert 4/5");
});

CUDA_CPU_CASE("lora/only null experts give zero delta", "", [] {
  const LoraShape s{10, 6, 7, 2, 3, 2, 2, 1.0};
  Inputs in = make_inputs(s, 6);
  for (int64_t t = 0; t < s.T; ++t) in.logits[t * 4] = in.logits[t * 4 + 1] = -50.0;
  const Result got = check_lora(DType::kFloat64, s, in);
  for (double v : got.y) check(v == 0, "y is not exactly 0");
  for (double v : got.dx) check(v == 0, "dx is not exactly 0");
});

// test_out_of_range_ids_add_nothing_without_debug_mode: ids past E + N and negative ones
// act as null experts, with no out-of-bounds access (ASan watches).
CUDA_CPU_CASE("lora/bad ids act as null experts", "", [] {
  const LoraShape bad_s{24, 24, 20, 2, 4, 0, 2, 0.5}, null_s{24, 24, 20, 2, 4, 1, 2, 0.5};
  const Inputs in = make_inputs(null_s, 8);
  const ref::Routing r = ref::route(in.logits, {}, null_s.T, 3, 2, 1.0, true);
  std::vector<int64_t> bad = r.experts;
  for (auto& e : bad)
    if (e == 2) e = 7;
  bad[1] = -3;
  std::vector<int64_t> as_null = bad;
  for (auto& e : as_null)
    if (e < 0 || e >= 2) e = 2;
  const Result got = run_model(DType::kFloat32, bad_s, in, r.weights, bad);
  const Result want = run_model(DType::kFloat32, null_s, in, r.weights, as_null);
  expect_result(DType::kFloat64, got, want);  // identical up to float64 tolerance
  expect_result(DType::kFloat32, got, run_reference(DType::kFloat32, bad_s, in, r.weights, bad));
});

// One hot expert with more than kGradChunk (512) pairs: its weight gradients come from 3
// chunks (512 + 512 + 76 pairs) added by weight_grad_reduce, beside experts of one chunk
// (written directly), a never-chosen one and null experts in slot 1.
Inputs hot_expert_inputs(const LoraShape& s) {
  Inputs in = make_inputs(s, 12);
  const int64_t M = s.E + s.N;
  for (int64_t t = 0; t < s.T; ++t) {
    in.logits[t * M + 1] = 30.0;                            // every token's first choice
    in.logits[t * M + 3] = -30.0;                           // never chosen
  }
  return in;
}

CUDA_CPU_CASE("lora/one hot expert over 3 weight-gradient chunks", "", [] {
  const LoraShape s{1100, 6, 9, 5, 3, 1, 2, 0.8};
  const Result got = check_lora(DType::kFloat64, s, hot_expert_inputs(s));
  for (int64_t i = 3 * s.R * s.D; i < 4 * s.R * s.D; ++i) check(got.dA[i] == 0, "dA of expert 3");
});

CUDA_CPU_CASE("lora/one hot expert, bf16, R > 16", "tsan", [] {
  const LoraShape s{520, 8, 16, 4, 18, 0, 2, 0.8};  // expert 1: 520 pairs, 2 chunks
  check_lora(DType::kBFloat16, s, hot_expert_inputs(s));
});

// launch_weight_grad alone, on a hand-made alignment, against a float64 sum: for fp16 /
// bf16 the tensor-core kernel (weight_grad_tc) on both staging paths, R over rank chunks
// of 16 (zero-padded), column blocks of 128 (the last partial), an expert over several
// pair chunks (weight_grad_reduce), a never-chosen expert, null and bad ids, and pairs in
// the wrong bin (skipped), written through transposed, padded output strides.
struct GradCase {
  DType t;
  int64_t T, K, E, R, n;
  int64_t hot;       // the first `hot` tokens put slot 0 on expert 1 (> 512: several chunks)
  bool pair_scale;   // dB's form (coef h, scale s w) or dA's (coef dh, no scale)
  int64_t shift;     // rows start this many elements into their buffer (1: misaligned)
};

void check_weight_grad(const GradCase& c, uint64_t seed) {
  const int64_t P = c.T * c.K, E = c.E, R = c.R, n = c.n;
  // Experts 0..E-2, a null id (E) and bad ids (-2, E + 5); expert E - 1 never chosen.
  std::vector<int64_t> ids(P);
  for (int64_t p = 0; p < P; ++p)
    ids[p] = p / c.K < c.hot && p % c.K == 0 ? 1
             : p % 7 == 3                    ? (p % 2 ? -2 : E + 5)
             : p % 5 == 1                    ? E
                                             : int64_t((p * 7919 + seed) % (E - 1));
  auto bin = [&](int64_t e) { return e >= 0 && e < E ? e : E; };
  std::vector<int64_t> order, offsets(E + 2, 0);
  for (int64_t b = 0; b <= E; ++b) {
    offsets[b] = static_cast<int64_t>(order.size());
    for (int64_t p = 0; p < P; ++p)
      if (bin(ids[p]) == b) order.push_back(p);
  }
  offsets[E + 1] = P;
  offsets[1] -= 1;      // bin 0's last pair now opens bin 1: skipped by both
  offsets[E - 1] -= 1;  // the never-chosen expert's bin holds only a pair of expert E - 2
  const std::vector<double> rows = randn(c.T * n + c.shift, seed + 1);
  const std::vector<double> coef = randn(P * R, seed + 2), scale = randn(P, seed + 3);
  const double scaling = 0.7;
  const int64_t os_c = R, os_r = 1, os_e = n * R + 3;  // G_e stored (n, R), gaps between experts
  const Buffer rows_b = to_device(rows, c.t), coef_b = to_device(coef, DType::kFloat32);
  const Buffer scale_b = to_device(scale, DType::kFloat32), ids_b = ints_to_device(ids);
  const Buffer order_b = ints_to_device(order), offsets_b = ints_to_device(offsets);
  const auto* off = static_cast<const int64_t*>(offsets_b.get());
  Buffer map(3 * (E + 1) * 4, false), out(E * os_e * dtype_size(c.t), false);
  Buffer spill(moe_ext::cuda::max_grad_spill_slots(P) * R * n * 4, false);
  check_cuda(moe_ext::cuda::launch_grad_chunk_map(off, P, E, static_cast<int32_t*>(map.get()),
                                                  nullptr), "launch_grad_chunk_map");
  const char* row0 = static_cast<const char*>(rows_b.get()) + c.shift * dtype_size(c.t);
  check_cuda(moe_ext::cuda::launch_weight_grad(
                 c.t, coef_b.get(), c.pair_scale ? scale_b.get() : nullptr, scaling, row0, n,
                 static_cast<const int64_t*>(order_b.get()), off,
                 static_cast<const int32_t*>(map.get()), static_cast<const int64_t*>(ids_b.get()),
                 P, E, c.K, R, spill.get(), out.get(), os_e, os_r, os_c, nullptr),
             "launch_weight_grad");
  const auto x = rounded(rows, c.t), cf = rounded(coef, DType::kFloat32);
  const auto sc = rounded(scale, DType::kFloat32);
  std::vector<double> want(E * R * n, 0.0), got(E * R * n);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t i = off[e]; i < off[e + 1]; ++i) {
      const int64_t p = order[i];
      if (ids[p] != e) continue;
      const double s = c.pair_scale ? scaling * sc[p] : 1.0;
      for (int64_t r = 0; r < R; ++r)
        for (int64_t col = 0; col < n; ++col)
          want[(e * R + r) * n + col] += s * cf[p * R + r] * x[c.shift + (p / c.K) * n + col];
    }
  const auto all = to_host(out, c.t, E * os_e);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t col = 0; col < n; ++col)
        got[(e * R + r) * n + col] = all[e * os_e + r * os_r + col * os_c];
  expect_close("G", got, want, tolerance(c.t));
  for (int64_t i = (E - 1) * R * n; i < E * R * n; ++i) check(got[i] == 0, "G of expert E - 1");
  for (int64_t e = 0; e < E; ++e)  // the gaps between experts keep the poison (NaN)
    for (int64_t i = n * R; i < os_e; ++i) check(std::isnan(all[e * os_e + i]), "gap written");
}

CUDA_CPU_CASE("lora/weight_grad bf16 cp.async rows, R24 n200, hot expert over 2 chunks", "", [] {
  check_weight_grad({DType::kBFloat16, 600, 2, 4, 24, 200, 600, true, 0}, 21);
});

CUDA_CPU_CASE("lora/weight_grad f16 plain loads, R4 n37, hot expert over 2 chunks", "", [] {
  check_weight_grad({DType::kFloat16, 560, 1, 3, 4, 37, 530, false, 0}, 22);
});

CUDA_CPU_CASE("lora/weight_grad bf16 misaligned rows, R16 n16, one chunk of 3 stages", "tsan", [] {
  check_weight_grad({DType::kBFloat16, 170, 2, 4, 16, 16, 150, true, 1}, 23);  // 3 stages
});

CUDA_CPU_CASE("lora/bitwise repeatable", "", [] {
  const LoraShape s{40, 24, 20, 4, 8, 1, 2, 0.8};
  const Inputs in = make_inputs(s, 10);
  const ref::Routing r = ref::route(in.logits, {}, s.T, s.E + s.N, s.K, 1.0, true);
  const Result a = run_model(DType::kBFloat16, s, in, r.weights, r.experts);
  const Result b = run_model(DType::kBFloat16, s, in, r.weights, r.experts);
  for (auto [name, u, v] : {std::make_tuple("y", &a.y, &b.y), std::make_tuple("dx", &a.dx, &b.dx),
                            std::make_tuple("dA", &a.dA, &b.dA), std::make_tuple("dB", &a.dB, &b.dB),
                            std::make_tuple("dw", &a.dw, &b.dw)})
    check(std::memcmp(u->data(), v->data(), u->size() * sizeof(double)) == 0, name,
          " differs between two runs");
});

// The reference's gradients against central differences of the reference forward.
CUDA_CPU_CASE("reference/lora backward = finite differences", "", [] {
  const ref::Lora s{3, 4, 5, 2, 3, 2, 0.7};
  const LoraShape ls{3, 4, 5, 2, 3, 1, 2, 0.7};
  Inputs in = make_inputs(ls, 31);
  const ref::Routing r = ref::route(in.logits, {}, 3, 3, 2, 1.0, true);
  auto loss = [&](const Inputs& v, const std::vector<double>& w) {
    std::vector<double> y, h;
    ref::lora_forward(s, v.x, v.A, v.B, w, r.experts, y, h);
    double l = 0;
    for (size_t i = 0; i < y.size(); ++i) l += y[i] * in.gy[i];
    return l;
  };
  std::vector<double> y, h;
  ref::lora_forward(s, in.x, in.A, in.B, r.weights, r.experts, y, h);
  const ref::LoraGrads g = ref::lora_backward(s, in.gy, in.x, in.A, in.B, r.weights, r.experts, h);
  auto probe = [&](const char* name, std::vector<double>& v, const std::vector<double>& grad,
                   std::vector<double>& w) {
    for (size_t i = 0; i < v.size(); ++i) {
      const double keep = v[i];
      v[i] = keep + 1e-6;
      const double up = loss(in, w);
      v[i] = keep - 1e-6;
      const double down = loss(in, w);
      v[i] = keep;
      const double fd = (up - down) / 2e-6;
      check(std::fabs(fd - grad[i]) < 1e-7, name, "[", i, "] = ", grad[i], ", finite differences ", fd);
    }
  };
  std::vector<double> w = r.weights;
  probe("dx", in.x, g.dx, w);
  probe("dA", in.A, g.dA, w);
  probe("dB", in.B, g.dB, w);
  probe("dw", w, g.dw, w);
});

}  // namespace
}  // namespace cuda_cpu
