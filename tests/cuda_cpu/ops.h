// The ops' launch sequences, as csrc/cuda/*_cuda.cpp run them (allocation like at::empty
// = poisoned, at::zeros = zeroed), on the CPU execution model's host buffers. Keep in step
// with those files: they are torch code and cannot be compiled here.
#pragma once
#include <algorithm>
#include <cstdint>

#include "harness.h"

namespace cuda_cpu {

using moe_ext::cuda::ExpertWeights;

struct RouteOut {
  Buffer probs, weights, experts, counts;
};

// route_cuda: logits (T, M) in `t`; bias (M,) acc or empty.
inline RouteOut route(DType t, const Buffer& logits, const Buffer& bias, int64_t T, int64_t M,
                      int64_t K, double tau, bool normalize) {
  const size_t acc = dtype_size(acc_of(t));
  RouteOut r{Buffer(T * M * acc, false), Buffer(T * K * acc, false), Buffer(T * K * 8, false),
             Buffer(M * 8, true)};
  check_cuda(moe_ext::cuda::launch_route(t, logits.get(), bias.get(), T, M, K, 1.0 / tau, normalize,
                                         r.probs.get(), r.weights.get(),
                                         static_cast<int64_t*>(r.experts.get()),
                                         static_cast<int64_t*>(r.counts.get()), nullptr),
             "launch_route");
  return r;
}

inline Buffer route_backward(DType acc, const Buffer& grad_probs, const Buffer& grad_weights,
                             const RouteOut& r, int64_t T, int64_t M, int64_t K, double tau,
                             bool normalize) {
  Buffer out(T * M * dtype_size(acc), false);
  check_cuda(moe_ext::cuda::launch_route_backward(
                 acc, grad_probs.get(), grad_weights.get(), r.probs.get(), r.weights.get(),
                 static_cast<const int64_t*>(r.experts.get()), T, M, K, 1.0 / tau, normalize,
                 out.get(), nullptr),
             "launch_route_backward");
  return out;
}

struct AlignOut {
  Buffer order, offsets;
};

// align_cuda
inline AlignOut align(const Buffer& ids, int64_t P, int64_t bins) {
  AlignOut a{Buffer(P * 8, false), Buffer((bins + 1) * 8, false)};
  Buffer scratch(moe_ext::cuda::align_scratch_ints(P, bins) * 4, false);
  check_cuda(moe_ext::cuda::launch_align(static_cast<const int64_t*>(ids.get()), P, bins,
                                         static_cast<int32_t*>(scratch.get()),
                                         static_cast<int64_t*>(a.order.get()),
                                         static_cast<int64_t*>(a.offsets.get()), nullptr),
             "launch_align");
  return a;
}

struct LoraShape {
  int64_t T, D, O, E, R, N, K;
  double scaling;
  int64_t P() const { return T * K; }
};

// W_e[i, j] views (lora_cuda.cpp): A (E, R, D) as rows (r, d) and as columns (d, r); B
// (E, O, R) likewise.
inline ExpertWeights a_rows(const Buffer& A, const LoraShape& s) { return {A.get(), s.R * s.D, s.D, 1}; }
inline ExpertWeights a_cols(const Buffer& A, const LoraShape& s) { return {A.get(), s.R * s.D, 1, s.D}; }
inline ExpertWeights b_rows(const Buffer& B, const LoraShape& s) { return {B.get(), s.O * s.R, 1, s.R}; }
inline ExpertWeights b_cols(const Buffer& B, const LoraShape& s) { return {B.get(), s.O * s.R, s.R, 1}; }

// tile_map of lora_cuda.cpp: tiles of the E + 1 bins.
inline Buffer tile_map(const Buffer& offsets, int64_t E) {
  Buffer tiles((E + 2) * 4, false);
  check_cuda(moe_ext::cuda::launch_tile_map(static_cast<const int64_t*>(offsets.get()), E + 1,
                                            static_cast<int32_t*>(tiles.get()), nullptr),
             "launch_tile_map");
  return tiles;
}

// lora_cuda.cpp's expand_slots: one expand launch per slot, adding into out in k order.
inline void expand_slots(DType t, const Buffer& coef, const Buffer& pair_scale, double scaling,
                         ExpertWeights W, int64_t n, const AlignOut& a, const Buffer& tiles,
                         const LoraShape& s, Buffer& out) {
  check_cuda(moe_ext::cuda::launch_grouped_expand(
                 t, coef.get(), pair_scale.get(), scaling, W, n,
                 static_cast<const int64_t*>(a.order.get()), static_cast<const int64_t*>(a.offsets.get()),
                 static_cast<const int32_t*>(tiles.get()), s.T, s.E, s.K, s.R, out.get(), nullptr),
             "launch_grouped_expand");
}

struct LoraForward {
  Buffer y, h;
  AlignOut a;  // the pairs' alignment (E + 1 bins), returned for the backward
};

// lora_forward_cuda: x (T, D), A (E, R, D), B (E, O, R) in `t`; w (T, K) acc; experts (T, K).
inline LoraForward lora_forward(DType t, const LoraShape& s, const Buffer& x, const Buffer& A,
                                const Buffer& B, const Buffer& w, const Buffer& experts) {
  const int64_t P = s.P();
  LoraForward f{Buffer(s.T * s.O * dtype_size(t), false), Buffer(P * s.R * dtype_size(acc_of(t)), false),
                align(experts, P, s.E + 1)};
  const Buffer tiles = tile_map(f.a.offsets, s.E);
  check_cuda(moe_ext::cuda::launch_grouped_shrink(
                 t, x.get(), s.D, a_rows(A, s), static_cast<const int64_t*>(f.a.order.get()),
                 static_cast<const int64_t*>(f.a.offsets.get()), static_cast<const int32_t*>(tiles.get()),
                 static_cast<const int64_t*>(experts.get()), P, s.E, s.K, s.R, nullptr, f.h.get(),
                 nullptr),
             "launch_grouped_shrink");
  expand_slots(t, f.h, w, s.scaling, b_cols(B, s), s.O, f.a, tiles, s, f.y);
  return f;
}

struct LoraBackward {
  Buffer dx, dw, dA, dB;
};

// lora_backward_cuda: dy (T, O) in `t`; `a` the forward's alignment; h (P, R) acc.
inline LoraBackward lora_backward(DType t, const LoraShape& s, const Buffer& dy, const Buffer& x,
                                  const Buffer& A, const Buffer& B, const Buffer& w,
                                  const Buffer& experts, const AlignOut& a, const Buffer& h) {
  const int64_t P = s.P();
  const DType acc = acc_of(t);
  const auto* ord = static_cast<const int64_t*>(a.order.get());
  const auto* off = static_cast<const int64_t*>(a.offsets.get());
  const auto* ids = static_cast<const int64_t*>(experts.get());
  const Buffer tiles = tile_map(a.offsets, s.E);
  const auto* tl = static_cast<const int32_t*>(tiles.get());
  LoraBackward g{Buffer(s.T * s.D * dtype_size(t), false), Buffer(P * dtype_size(acc), false),
                 Buffer(s.E * s.R * s.D * dtype_size(t), false),
                 Buffer(s.E * s.O * s.R * dtype_size(t), false)};
  Buffer dh(P * s.R * dtype_size(acc), false);
  const moe_ext::cuda::PairGrads grads{h.get(), w.get(), s.scaling, g.dw.get()};
  check_cuda(moe_ext::cuda::launch_grouped_shrink(t, dy.get(), s.O, b_rows(B, s), ord, off, tl, ids,
                                                  P, s.E, s.K, s.R, &grads, dh.get(), nullptr),
             "launch_grouped_shrink (backward)");
  expand_slots(t, dh, Buffer(), 1.0, a_cols(A, s), s.D, a, tiles, s, g.dx);
  Buffer chunk_map(3 * (s.E + 1) * 4, false);
  check_cuda(moe_ext::cuda::launch_grad_chunk_map(off, P, s.E, static_cast<int32_t*>(chunk_map.get()),
                                                  nullptr),
             "launch_grad_chunk_map");
  const auto* chunks = static_cast<const int32_t*>(chunk_map.get());
  Buffer spill(moe_ext::cuda::max_grad_spill_slots(P) * s.R * std::max(s.D, s.O) * dtype_size(acc),
               false);
  check_cuda(moe_ext::cuda::launch_weight_grad(t, dh.get(), nullptr, 1.0, x.get(), s.D, ord, off,
                                               chunks, ids, P, s.E, s.K, s.R, spill.get(), g.dA.get(),
                                               s.R * s.D, s.D, 1, nullptr),
             "launch_weight_grad (dA)");
  check_cuda(moe_ext::cuda::launch_weight_grad(t, h.get(), w.get(), s.scaling, dy.get(), s.O, ord, off,
                                               chunks, ids, P, s.E, s.K, s.R, spill.get(), g.dB.get(),
                                               s.O * s.R, 1, s.R, nullptr),
             "launch_weight_grad (dB)");
  return g;
}

// lora_dense_cuda.cpp's generic path: the gate kernels around its cuBLAS GEMMs (which
// the model cannot run). in, out (T, E R) in `t`; w (T, K) acc.
inline Buffer dense_gate(DType t, const Buffer& in, const Buffer& w, const Buffer& experts,
                         int64_t T, int64_t E, int64_t R, int64_t K, double scaling) {
  Buffer out(T * E * R * dtype_size(t), false);
  check_cuda(moe_ext::cuda::launch_dense_gate(t, in.get(), w.get(),
                                              static_cast<const int64_t*>(experts.get()), T, E, R,
                                              K, scaling, out.get(), nullptr),
             "launch_dense_gate");
  return out;
}

inline Buffer dense_gate_grad_w(DType t, const Buffer& d_gated, const Buffer& h_all,
                                const Buffer& experts, int64_t T, int64_t E, int64_t R, int64_t K,
                                double scaling) {
  Buffer dw(T * K * dtype_size(acc_of(t)), false);
  check_cuda(moe_ext::cuda::launch_dense_gate_grad_w(
                 t, d_gated.get(), h_all.get(), static_cast<const int64_t*>(experts.get()), T, E,
                 R, K, scaling, dw.get(), nullptr),
             "launch_dense_gate_grad_w");
  return dw;
}

struct DenseForward {
  Buffer y, h_all;
};

// lora_dense_forward_cuda's fused path: x (T, D), A (E, R, D), B (E, O, R) in `t`.
inline DenseForward lora_dense_fused_forward(DType t, const LoraShape& s, const Buffer& x,
                                             const Buffer& A, const Buffer& B, const Buffer& w,
                                             const Buffer& experts) {
  check(moe_ext::cuda::dense_fused_supported(t, s.T, s.D, s.O, s.E, s.R, s.K),
        "the fused dense forward does not take this shape / dtype");
  DenseForward f{Buffer(s.T * s.O * dtype_size(t), false),
                 Buffer(s.T * s.E * s.R * dtype_size(t), false)};
  check_cuda(moe_ext::cuda::launch_lora_dense_fused_forward(
                 t, x.get(), A.get(), B.get(), w.get(), static_cast<const int64_t*>(experts.get()),
                 s.T, s.D, s.O, s.E, s.R, s.K, s.scaling, f.y.get(), f.h_all.get(), nullptr),
             "launch_lora_dense_fused_forward");
  return f;
}

struct DenseBackward {
  Buffer dx, dw, dA, dB;
};

// lora_dense_backward_cuda's fused path: dy (T, O), h_all (T, E R) in `t`.
inline DenseBackward lora_dense_fused_backward(DType t, const LoraShape& s, const Buffer& dy,
                                               const Buffer& x, const Buffer& A, const Buffer& B,
                                               const Buffer& h_all, const Buffer& w,
                                               const Buffer& experts) {
  const size_t el = dtype_size(t);
  const int64_t ER = s.E * s.R, splits = moe_ext::cuda::dense_backward_splits(s.T);
  DenseBackward g{Buffer(s.T * s.D * el, false), Buffer(s.T * s.K * 4, false),
                  Buffer(ER * s.D * el, false), Buffer(s.E * s.O * s.R * el, false)};
  Buffer dh(s.T * ER * el, false), gated(s.T * ER * el, false);
  Buffer partial(splits * ER * (s.D + s.O) * 4, false);
  const moe_ext::cuda::DenseBackwardArgs args{
      dy.get(), x.get(), A.get(), B.get(), h_all.get(), w.get(),
      static_cast<const int64_t*>(experts.get()), s.T, s.D, s.O, s.E, s.R, s.K, s.scaling,
      g.dx.get(), g.dw.get(), g.dA.get(), g.dB.get(), dh.get(), gated.get(), partial.get()};
  check_cuda(moe_ext::cuda::launch_lora_dense_fused_backward(t, args, nullptr),
             "launch_lora_dense_fused_backward");
  return g;
}

struct DenseExpandBackward {
  Buffer dh_all, dw, dB;
};

// lora_dense_expand_cuda's fused path: y (T, O) from h_all (T, E R) in `t`.
inline Buffer lora_dense_expand_forward(DType t, const LoraShape& s, const Buffer& h_all,
                                        const Buffer& B, const Buffer& w, const Buffer& experts) {
  check(moe_ext::cuda::dense_expand_supported(t, s.T, s.O, s.E, s.R, s.K),
        "the dense expand kernel does not take this shape / dtype");
  Buffer y(s.T * s.O * dtype_size(t), false);
  check_cuda(moe_ext::cuda::launch_lora_dense_expand_forward(
                 t, h_all.get(), B.get(), w.get(), static_cast<const int64_t*>(experts.get()),
                 s.T, s.O, s.E, s.R, s.K, s.scaling, y.get(), nullptr),
             "launch_lora_dense_expand_forward");
  return y;
}

// lora_dense_expand_backward_cuda's fused path: dy (T, O), h_all (T, E R) in `t`.
inline DenseExpandBackward lora_dense_expand_backward(DType t, const LoraShape& s,
                                                      const Buffer& dy, const Buffer& h_all,
                                                      const Buffer& B, const Buffer& w,
                                                      const Buffer& experts) {
  const size_t el = dtype_size(t);
  const int64_t ER = s.E * s.R, splits = moe_ext::cuda::dense_backward_splits(s.T);
  DenseExpandBackward g{Buffer(s.T * ER * el, false), Buffer(s.T * s.K * 4, false),
                        Buffer(s.E * s.O * s.R * el, false)};
  Buffer gated(s.T * ER * el, false), partial(splits * ER * s.O * 4, false);
  const moe_ext::cuda::DenseBackwardArgs args{
      dy.get(), nullptr, nullptr, B.get(), h_all.get(), w.get(),
      static_cast<const int64_t*>(experts.get()), s.T, 0, s.O, s.E, s.R, s.K, s.scaling,
      nullptr, g.dw.get(), nullptr, g.dB.get(), g.dh_all.get(), gated.get(), partial.get()};
  check_cuda(moe_ext::cuda::launch_lora_dense_expand_backward(t, args, nullptr),
             "launch_lora_dense_expand_backward");
  return g;
}

}  // namespace cuda_cpu
