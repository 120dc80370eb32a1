// Scalar math shared by the CPU and CUDA kernels (host-device inline), so the two
// backends cannot drift apart. Accumulation type `acc_t` is float, or double for
// float64 inputs.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "macros.h"

namespace protoseg {

// Unqualified calls pick float overloads on the host too (and CUDA's on device).
using std::exp;
using std::log;
using std::sqrt;

template <typename acc_t>
PROTOSEG_INLINE acc_t neg_infinity() {
  return -std::numeric_limits<acc_t>::infinity();
}

// 1 / max(sqrt(sum_sq), eps): the factor that normalises a vector with ‖v‖² = sum_sq.
template <typename acc_t>
PROTOSEG_INLINE acc_t inverse_norm(acc_t sum_sq) {
  const acc_t norm = sqrt(sum_sq);
  return acc_t(1) / (norm > acc_t(kNormEps) ? norm : acc_t(kNormEps));
}

// Backward of v̂ = v / max(‖v‖, eps) for one element:
//   dv = (g − v̂·⟨g, v̂⟩)/‖v‖ where ‖v‖ > eps, else g/eps (the clamp is constant).
// `g_dot_hat` is ⟨g, v̂⟩ over the whole vector, `inv_norm` = inverse_norm(‖v‖²).
template <typename acc_t>
PROTOSEG_INLINE acc_t normalize_backward(acc_t g, acc_t v_hat, acc_t g_dot_hat, acc_t inv_norm,
                                         bool clamped) {
  return clamped ? g * inv_norm : (g - v_hat * g_dot_hat) * inv_norm;
}

// True when the norm was clamped to eps (‖v‖ <= eps).
template <typename acc_t>
PROTOSEG_INLINE bool norm_is_clamped(acc_t sum_sq) {
  return sqrt(sum_sq) <= acc_t(kNormEps);
}

// Running log-sum-exp over a stream of values: (max, Σ exp(v − max)).
// merge() combines two partial states, so a reduction can be split into blocks
// and combined in a fixed order (deterministic).
template <typename acc_t>
struct OnlineLogSumExp {
  acc_t max = neg_infinity<acc_t>();
  acc_t sum = acc_t(0);

  PROTOSEG_INLINE void add(acc_t v) {
    if (v > max) {
      sum = sum * exp(max - v) + acc_t(1);
      max = v;
    } else {
      sum += exp(v - max);
    }
  }

  PROTOSEG_INLINE void merge(const OnlineLogSumExp& other) {
    if (other.max == neg_infinity<acc_t>()) return;
    if (max == neg_infinity<acc_t>()) {
      *this = other;
      return;
    }
    if (other.max > max) {
      sum = sum * exp(max - other.max) + other.sum;
      max = other.max;
    } else {
      sum += other.sum * exp(other.max - max);
    }
  }

  // log Σ exp(v); -inf when nothing was added.
  PROTOSEG_INLINE acc_t value() const {
    return max == neg_infinity<acc_t>() ? max : max + log(sum);
  }
};

// Log-sum-exp and first argmax of a short row z[0..n) (n = K prototypes of a class).
template <typename acc_t>
struct RowStats {
  acc_t lse;
  int64_t argmax;
};

template <typename acc_t, typename Row>
PROTOSEG_INLINE RowStats<acc_t> row_logsumexp_argmax(const Row& z, int64_t n) {
  acc_t best = z(0);
  int64_t best_k = 0;
  for (int64_t k = 1; k < n; ++k) {
    const acc_t v = z(k);
    if (v > best) {  // strict: the first maximum wins ties
      best = v;
      best_k = k;
    }
  }
  acc_t sum = acc_t(0);
  for (int64_t k = 0; k < n; ++k) sum += exp(z(k) - best);
  return {best + log(sum), best_k};
}

// One pixel's Sinkhorn step (docs/spec.md §3.4): z_k = L_k + β_k; q_k = softmax_k(z).
// `visit(k, q_k)` receives each probability (to accumulate marginals or write q).
// Returns the first argmax of z.
template <typename acc_t, typename Logits, typename Beta, typename Visit>
PROTOSEG_INLINE int64_t sinkhorn_pixel_step(const Logits& logits, const Beta& beta, int64_t n,
                                            Visit visit) {
  auto z = [&](int64_t k) { return acc_t(logits(k)) + acc_t(beta(k)); };
  const RowStats<acc_t> stats = row_logsumexp_argmax<acc_t>(z, n);
  for (int64_t k = 0; k < n; ++k) visit(k, exp(z(k) - stats.lse));
  return stats.argmax;
}

// Momentum update of one prototype element (docs/spec.md §3.5), before the final
// renormalisation: γ·p̂ + (1 − γ)·ŝ, with ŝ = s·inverse_norm(‖s‖²).
template <typename acc_t>
PROTOSEG_INLINE acc_t momentum_blend(acc_t p_hat, acc_t s, acc_t inv_norm_s, acc_t momentum) {
  return momentum * p_hat + (acc_t(1) - momentum) * (s * inv_norm_s);
}

// True when a sanitised index (−1 = ignored) addresses a valid slot in [0, upper).
PROTOSEG_INLINE bool index_in_range(int64_t index, int64_t upper) {
  return index >= 0 && index < upper;
}

}  // namespace protoseg
