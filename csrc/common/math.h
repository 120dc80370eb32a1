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
using std::log1p;
using std::sqrt;

template <typename acc_t>
PROTOSEG_INLINE acc_t neg_infinity() {
  return -std::numeric_limits<acc_t>::infinity();
}

// 1 / max(sqrt(sum_sq), eps): the factor that normalises a vector with ‖v‖² = sum_sq.
// A NaN norm gives NaN (a plain `norm > eps ? norm : eps` would clamp it to eps).
template <typename acc_t>
PROTOSEG_INLINE acc_t inverse_norm(acc_t sum_sq) {
  const acc_t norm = sqrt(sum_sq);
  return acc_t(1) / (norm <= acc_t(kNormEps) ? acc_t(kNormEps) : norm);
}

// The test of every running "first maximum": v replaces best when it is strictly greater,
// or when it is the first NaN. NaN ranks above every number (as in torch.max), so a NaN
// anywhere gives a NaN maximum at the first NaN's index. Bitwise ops keep loops branch-free.
template <typename acc_t>
PROTOSEG_INLINE bool replaces_max(acc_t v, acc_t best) {
  return (v > best) | ((v != v) & (best == best));
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

// The shift of a two-pass log-sum-exp, log Σ exp(v) = m + log Σ exp(v − shift) with m the
// max: the max itself, or 0 when it is ±inf (torch.logsumexp's rule), since v − m would be
// inf − inf = NaN there; with 0 the sum is inf (lse = +inf) or 0 (all −inf: lse = −inf).
template <typename acc_t>
PROTOSEG_INLINE acc_t lse_shift(acc_t max) {
  return (max == -neg_infinity<acc_t>() || max == neg_infinity<acc_t>()) ? acc_t(0) : max;
}

// Running log-sum-exp over a stream of values: (max, Σ exp(v − max)).
// merge() combines two partial states, so a reduction can be split into blocks
// and combined in a fixed order (deterministic).
template <typename acc_t>
struct OnlineLogSumExp {
  acc_t max = neg_infinity<acc_t>();
  acc_t sum = acc_t(0);

  // A value equal to the max adds exactly 1 (exp(0)): for an infinite max, exp(v − max)
  // would be exp(inf − inf) = NaN, so two +inf values give lse = +inf and values that are
  // all −inf give −inf, as torch.logsumexp does (docs/spec.md §3, "Non-finite inputs").
  PROTOSEG_INLINE void add(acc_t v) {
    if (v > max) {
      sum = sum * exp(max - v) + acc_t(1);
      max = v;
    } else {
      sum += v == max ? acc_t(1) : exp(v - max);
    }
  }

  // An empty state is (−inf, 0); a NaN added leaves sum NaN (max may stay −inf), so
  // emptiness is tested on the sum: a block of NaNs is never dropped.
  PROTOSEG_INLINE void merge(const OnlineLogSumExp& other) {
    if (other.sum == acc_t(0)) return;
    if (sum == acc_t(0)) {
      *this = other;
      return;
    }
    if (other.max > max) {
      sum = sum * exp(max - other.max) + other.sum;
      max = other.max;
    } else {
      sum += other.max == max ? other.sum : other.sum * exp(other.max - max);  // (inf, inf): see add
    }
  }

  // log Σ exp(v); -inf when nothing was added (−inf + log 0). Unguarded on purpose: values
  // that were all NaN leave max at −inf and sum NaN, which a test of max would turn into −inf.
  PROTOSEG_INLINE acc_t value() const { return max + log(sum); }
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
// Returns the first argmax of z, or −1 when z holds a NaN (then every q_k is NaN).
template <typename acc_t, typename Logits, typename Beta, typename Visit>
PROTOSEG_INLINE int64_t sinkhorn_pixel_step(const Logits& logits, const Beta& beta, int64_t n,
                                            Visit visit) {
  auto z = [&](int64_t k) { return acc_t(logits(k)) + acc_t(beta(k)); };
  const RowStats<acc_t> stats = row_logsumexp_argmax<acc_t>(z, n);
  for (int64_t k = 0; k < n; ++k) visit(k, exp(z(k) - stats.lse));
  return stats.lse == stats.lse ? stats.argmax : int64_t(-1);  // a NaN anywhere makes lse NaN
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

// ---- pixel contrast (docs/spec.md §10.1) ---------------------------------------------
// Per-entry math of pixel_contrast_loss in the logits ℓ = ⟨â, ĉ⟩/τ, kept in the log domain so
// that no exponent is positive beyond log |P(i)| (τ = 1e-3 gives |ℓ| up to 1000). No function
// here compares a value that may be NaN in a way that drops it.

// What a contrast entry is to an anchor: a positive (same class), a negative (another
// class) or nothing (either side ignored, label < 0, or the anchor itself in-batch).
enum class ContrastRole { kNone, kPositive, kNegative };

PROTOSEG_INLINE ContrastRole contrast_role(int64_t anchor_label, int64_t column_label, bool is_self) {
  if (anchor_label < 0 || column_label < 0 || is_self) return ContrastRole::kNone;
  return anchor_label == column_label ? ContrastRole::kPositive : ContrastRole::kNegative;
}

// log(1 + e^x) without overflow; softplus(−inf) = 0 and NaN stays NaN (through the log1p).
template <typename acc_t>
PROTOSEG_INLINE acc_t softplus(acc_t x) {
  const acc_t minus_magnitude = x > acc_t(0) ? -x : x;
  return (x > acc_t(0) ? x : acc_t(0)) + log1p(exp(minus_magnitude));
}

// 1 / (1 + e^{−x}); e^{−x} may overflow to inf, which gives the correct 0.
template <typename acc_t>
PROTOSEG_INLINE acc_t sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + exp(-x));
}

// ContrastiveSeg's term of positive p, log(e^{ℓ_p} + N) − ℓ_p = softplus(log N − ℓ_p): it
// never forms e^{ℓ_p}, and it is 0 for an anchor without negatives (log N = −inf).
template <typename acc_t>
PROTOSEG_INLINE acc_t contrastiveseg_positive_term(acc_t logit, acc_t log_norm) {
  return softplus(log_norm - logit);
}

// ∂loss/∂ℓ of one entry (docs/spec.md §10.1), given w = g·s/|P| of an anchor with positives:
// −w·(1 − σ_p) = −w·sigmoid(log N − ℓ_p) on a positive, w·e^{ℓ_k}·B = w·e^{ℓ_k + log B} on
// a negative (ℓ_k + log B ≤ log |P|, since B ≤ |P|/N and e^{ℓ_k} ≤ N).
template <typename acc_t>
PROTOSEG_INLINE acc_t contrastiveseg_logit_gradient(ContrastRole role, acc_t w, acc_t logit, acc_t log_norm,
                                                    acc_t log_b) {
  if (role == ContrastRole::kPositive) return -w * sigmoid(log_norm - logit);
  if (role == ContrastRole::kNegative) return w * exp(logit + log_b);
  return acc_t(0);
}

// SupCon's ∂loss/∂ℓ of one entry: g·s·softmax − w·[positive], with softmax = e^{ℓ − LSE}
// over P ∪ N (an exponent ≤ 0) and coefficient = g·s.
template <typename acc_t>
PROTOSEG_INLINE acc_t supcon_logit_gradient(ContrastRole role, acc_t coefficient, acc_t w, acc_t logit,
                                            acc_t log_norm) {
  if (role == ContrastRole::kNone) return acc_t(0);
  const acc_t on_all = coefficient * exp(logit - log_norm);
  return role == ContrastRole::kPositive ? on_all - w : on_all;
}

}  // namespace protoseg
