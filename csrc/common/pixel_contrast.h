// Per-element math of pixel_contrast_loss (docs/spec.md §10.1), shared by the CPU and CUDA
// kernels (host-device inline). ℓ is a logit ⟨â_i, ĉ_j⟩/τ; `log_norm` is log N_i (the
// negatives' log-sum-exp) for the ContrastiveSeg denominator, the log-sum-exp over
// P(i) ∪ N(i) for SupCon; `log_b` is log B_i = log Σ_p 1/(e^{ℓ_ip} + N_i).
#pragma once

#include "math.h"

namespace protoseg {

using std::log1p;

// log(1 + e^x) without overflow; NaN stays NaN, softplus(−inf) = 0.
template <typename acc_t>
PROTOSEG_INLINE acc_t softplus(acc_t x) {
  return x > acc_t(0) ? x + log1p(exp(-x)) : log1p(exp(x));
}

// One positive's ContrastiveSeg term log(e^ℓ + N_i) − ℓ = softplus(log N_i − ℓ): the
// difference is formed before any exponential, so small temperatures cannot overflow.
template <typename acc_t>
PROTOSEG_INLINE acc_t contrast_positive_term(acc_t logit, acc_t log_norm) {
  return softplus(log_norm - logit);
}

// ∂loss/∂ℓ_ip on a positive (ContrastiveSeg): −w_i·(1 − σ_ip) = −w_i·sigmoid(log N_i − ℓ).
template <typename acc_t>
PROTOSEG_INLINE acc_t contrast_positive_grad(acc_t logit, acc_t log_norm, acc_t w) {
  return -w / (acc_t(1) + exp(logit - log_norm));
}

// ∂loss/∂ℓ_ik on a negative (ContrastiveSeg): w_i·e^{ℓ_ik}·B_i, its exponent ≤ log |P(i)|.
template <typename acc_t>
PROTOSEG_INLINE acc_t contrast_negative_grad(acc_t logit, acc_t log_b, acc_t w) {
  return w * exp(logit + log_b);
}

// ∂loss/∂ℓ_ij for SupCon on P(i) ∪ N(i): g_i·s·softmax_ij − w_i·[j ∈ P(i)].
template <typename acc_t>
PROTOSEG_INLINE acc_t supcon_grad(acc_t logit, acc_t log_norm, acc_t coefficient, acc_t w, bool positive) {
  return coefficient * exp(logit - log_norm) - (positive ? w : acc_t(0));
}

}  // namespace protoseg
