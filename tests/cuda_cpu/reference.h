// Float64 references of the ops, written from the math in docs/architecture.md (plain
// loops, nothing shared with csrc/cpu or csrc/cuda). Row-major vectors; P = T * K pairs,
// pair p = (token p / K, slot p % K); ids outside [0, E) are null (add nothing).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace cuda_cpu {
namespace ref {

using Vec = std::vector<double>;
using Ids = std::vector<int64_t>;

inline bool is_lora(int64_t e, int64_t E) { return e >= 0 && e < E; }

struct Routing {
  Vec probs, weights;  // (T, M), (T, K)
  Ids experts, counts; // (T, K), (M,)
};

// softmax((L + bias) / tau), top-K by (p descending, id ascending), renormalised.
inline Routing route(const Vec& logits, const Vec& bias, int64_t T, int64_t M, int64_t K,
                     double tau, bool normalize) {
  Routing r{Vec(T * M), Vec(T * K), Ids(T * K), Ids(M, 0)};
  for (int64_t t = 0; t < T; ++t) {
    double zmax = -INFINITY;
    Vec z(M);
    for (int64_t j = 0; j < M; ++j) {
      z[j] = (logits[t * M + j] + (bias.empty() ? 0.0 : bias[j])) / tau;
      zmax = std::max(zmax, z[j]);
    }
    double total = 0;
    for (int64_t j = 0; j < M; ++j) total += std::exp(z[j] - zmax);
    for (int64_t j = 0; j < M; ++j) r.probs[t * M + j] = std::exp(z[j] - zmax) / total;
    Ids order(M);
    for (int64_t j = 0; j < M; ++j) order[j] = j;
    const double* p = &r.probs[t * M];
    std::stable_sort(order.begin(), order.end(), [p](int64_t a, int64_t b) { return p[a] > p[b]; });
    double chosen = 0;
    for (int64_t k = 0; k < K; ++k) {
      r.experts[t * K + k] = order[k];
      r.weights[t * K + k] = p[order[k]];
      chosen += p[order[k]];
      ++r.counts[order[k]];
    }
    if (normalize)
      for (int64_t k = 0; k < K; ++k) r.weights[t * K + k] /= chosen;
  }
  return r;
}

// Gradient to the logits of sum(grad_probs * probs) + sum(grad_weights * weights).
inline Vec route_backward(const Vec& grad_probs, const Vec& grad_weights, const Routing& r,
                          int64_t T, int64_t M, int64_t K, double tau, bool normalize) {
  Vec out(T * M);
  for (int64_t t = 0; t < T; ++t) {
    Vec g(M, 0.0);
    if (!grad_probs.empty())
      for (int64_t j = 0; j < M; ++j) g[j] = grad_probs[t * M + j];
    const double* p = &r.probs[t * M];
    // d weights / d probs: w_k = p[e_k] / S with S the sum of the chosen probabilities.
    double S = 0;
    for (int64_t k = 0; k < K; ++k) S += p[r.experts[t * K + k]];
    for (int64_t k = 0; k < K; ++k) {
      const int64_t e = r.experts[t * K + k];
      const double gw = grad_weights[t * K + k];
      if (!normalize) {
        g[e] += gw;
        continue;
      }
      for (int64_t i = 0; i < K; ++i) {
        const int64_t j = r.experts[t * K + i];
        g[j] += gw * ((i == k ? 1.0 / S : 0.0) - p[e] / (S * S));
      }
    }
    double pg = 0;
    for (int64_t j = 0; j < M; ++j) pg += p[j] * g[j];
    for (int64_t j = 0; j < M; ++j) out[t * M + j] = p[j] * (g[j] - pg) / tau;
  }
  return out;
}

// Stable counting sort of ids into bins; ids outside [0, bins) go to the last bin.
inline void align(const Ids& ids, int64_t bins, Ids& order, Ids& offsets) {
  offsets.assign(bins + 1, 0);
  order.clear();
  auto bin = [bins](int64_t id) { return id >= 0 && id < bins ? id : bins - 1; };
  for (int64_t b = 0; b < bins; ++b) {
    offsets[b] = static_cast<int64_t>(order.size());
    for (size_t p = 0; p < ids.size(); ++p)
      if (bin(ids[p]) == b) order.push_back(static_cast<int64_t>(p));
  }
  offsets[bins] = static_cast<int64_t>(order.size());
}

struct Lora {
  int64_t T, D, O, E, R, K;
  double scaling;
};

// h[p] = A_e x_t for LoRA pairs (0 otherwise); y_t = s sum_k w_tk B_e h[p].
inline void lora_forward(const Lora& s, const Vec& x, const Vec& A, const Vec& B, const Vec& w,
                         const Ids& experts, Vec& y, Vec& h) {
  const int64_t P = s.T * s.K;
  h.assign(P * s.R, 0.0);
  y.assign(s.T * s.O, 0.0);
  for (int64_t p = 0; p < P; ++p) {
    const int64_t t = p / s.K, e = experts[p];
    if (!is_lora(e, s.E)) continue;
    for (int64_t r = 0; r < s.R; ++r) {
      double acc = 0;
      for (int64_t d = 0; d < s.D; ++d) acc += A[(e * s.R + r) * s.D + d] * x[t * s.D + d];
      h[p * s.R + r] = acc;
    }
    for (int64_t o = 0; o < s.O; ++o) {
      double acc = 0;
      for (int64_t r = 0; r < s.R; ++r) acc += B[(e * s.O + o) * s.R + r] * h[p * s.R + r];
      y[t * s.O + o] += s.scaling * w[p] * acc;
    }
  }
}

struct LoraGrads {
  Vec dx, dw, dA, dB;
};

// lora_dense_expand from a given h_all (T, E R): y (T, O) = s sum_k w_k B_{e_k} h_{e_k}, and
// the gradient of <gy, y> to h_all: dh_all[t, e R + r] = s sum_{k: e_k = e} w_k (B_e^T gy_t)_r.
inline void dense_expand(const Lora& s, const Vec& h_all, const Vec& B, const Vec& w,
                         const Ids& experts, const Vec& gy, Vec& y, Vec& dh_all) {
  y.assign(s.T * s.O, 0.0);
  dh_all.assign(s.T * s.E * s.R, 0.0);
  for (int64_t p = 0; p < s.T * s.K; ++p) {
    const int64_t t = p / s.K, e = experts[p];
    if (!is_lora(e, s.E)) continue;
    const double* h = &h_all[(t * s.E + e) * s.R];
    for (int64_t o = 0; o < s.O; ++o) {
      double acc = 0, g = s.scaling * w[p] * gy[t * s.O + o];
      for (int64_t r = 0; r < s.R; ++r) {
        acc += B[(e * s.O + o) * s.R + r] * h[r];
        dh_all[(t * s.E + e) * s.R + r] += g * B[(e * s.O + o) * s.R + r];
      }
      y[t * s.O + o] += s.scaling * w[p] * acc;
    }
  }
}

inline LoraGrads lora_backward(const Lora& s, const Vec& gy, const Vec& x, const Vec& A,
                               const Vec& B, const Vec& w, const Ids& experts, const Vec& h) {
  const int64_t P = s.T * s.K;
  LoraGrads g{Vec(s.T * s.D, 0.0), Vec(P, 0.0), Vec(s.E * s.R * s.D, 0.0), Vec(s.E * s.O * s.R, 0.0)};
  for (int64_t p = 0; p < P; ++p) {
    const int64_t t = p / s.K, e = experts[p];
    if (!is_lora(e, s.E)) continue;
    Vec gh(s.R, 0.0);  // B_e^T gy_t
    for (int64_t r = 0; r < s.R; ++r)
      for (int64_t o = 0; o < s.O; ++o) gh[r] += B[(e * s.O + o) * s.R + r] * gy[t * s.O + o];
    double dot = 0;
    for (int64_t r = 0; r < s.R; ++r) dot += gh[r] * h[p * s.R + r];
    g.dw[p] = s.scaling * dot;
    for (int64_t r = 0; r < s.R; ++r) {
      const double dh = s.scaling * w[p] * gh[r];
      for (int64_t d = 0; d < s.D; ++d) {
        g.dx[t * s.D + d] += A[(e * s.R + r) * s.D + d] * dh;
        g.dA[(e * s.R + r) * s.D + d] += dh * x[t * s.D + d];
      }
      for (int64_t o = 0; o < s.O; ++o)
        g.dB[(e * s.O + o) * s.R + r] += gy[t * s.O + o] * s.scaling * w[p] * h[p * s.R + r];
    }
  }
  return g;
}

// h_all (T, E R) = x A_all^T: every expert's shrink of every token.
inline Vec shrink_all(const Vec& x, const Vec& A, int64_t T, int64_t D, int64_t E, int64_t R) {
  Vec h(T * E * R, 0.0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t n = 0; n < E * R; ++n)
      for (int64_t d = 0; d < D; ++d) h[t * E * R + n] += x[t * D + d] * A[n * D + d];
  return h;
}

// gated[t, e R + r] = s (sum of w[t, k] over the slots k that chose e) h_all[t, e R + r].
inline Vec dense_gate(const Vec& h_all, const Vec& w, const Ids& experts, int64_t T, int64_t E,
                      int64_t R, int64_t K, double scaling) {
  Vec out(T * E * R);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t e = 0; e < E; ++e) {
      double gate = 0;
      for (int64_t k = 0; k < K; ++k)
        if (experts[t * K + k] == e) gate += w[t * K + k];
      for (int64_t r = 0; r < R; ++r)
        out[(t * E + e) * R + r] = scaling * gate * h_all[(t * E + e) * R + r];
    }
  return out;
}

// Gradient of sum(grad * dense_gate(h_all, w)) to w.
inline Vec dense_gate_grad_w(const Vec& grad, const Vec& h_all, const Ids& experts, int64_t T,
                             int64_t E, int64_t R, int64_t K, double scaling) {
  Vec dw(T * K, 0.0);
  for (int64_t p = 0; p < T * K; ++p) {
    const int64_t t = p / K, e = experts[p];
    if (!is_lora(e, E)) continue;
    for (int64_t r = 0; r < R; ++r)
      dw[p] += scaling * grad[(t * E + e) * R + r] * h_all[(t * E + e) * R + r];
  }
  return dw;
}

}  // namespace ref
}  // namespace cuda_cpu
