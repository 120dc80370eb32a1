// Loops the compiler vectorises: element-wise maps and reductions over a fixed number
// of independent lanes. The lane count is a constant of the source, not of the machine
// or the thread count, so a reduction adds its terms in the same order everywhere and
// its result is bitwise reproducible.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace protoseg::cpu {

constexpr int64_t kLanes = 32;

// e^x for float, branch-free so that a loop of it vectorises (std::exp does not).
// x = n·ln2 + r with |r| <= ln2/2 (Cody-Waite split of ln2), e^r by its degree-7 Taylor
// polynomial (truncation error < 6e-9, below float rounding), 2^n built in the exponent
// bits. Exact limits: 0 for x < -87 (the true value is a denormal), +inf for x > 88
// (used on arguments <= 0 only: shifted log-sum-exp and softmax terms). NaN stays NaN.
inline float fast_exp(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;      // ln2 rounded to a few bits: n·kLn2Hi is exact
  constexpr float kLn2Lo = -2.12194440e-4f;   // ln2 − kLn2Hi
  constexpr float kLowest = -87.0f;
  constexpr float kHighest = 88.0f;
  constexpr float kRoundMagic = 12582912.0f;  // 1.5·2^23: (v + magic) − magic rounds v
  const float clamped = x < kLowest ? kLowest : (x > kHighest ? kHighest : x);
  float n = (clamped * kLog2e + kRoundMagic) - kRoundMagic;
  const float r = (clamped - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  n = (n == n) ? n : 0.0f;  // NaN input: keep the integer conversion defined (p is NaN)
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_to_n;
  std::memcpy(&two_to_n, &bits, sizeof(two_to_n));
  float result = p * two_to_n;
  result = x < kLowest ? 0.0f : result;
  result = x > kHighest ? std::numeric_limits<float>::infinity() : result;
  return result;
}

// The exponential the epilogues use: the vectorisable one for float, std::exp for
// double (the float64 path serves gradcheck, where accuracy is what counts).
inline float vexp(float x) { return fast_exp(x); }
inline double vexp(double x) { return std::exp(x); }

// NaN-propagating maximum (a NaN anywhere makes the result NaN).
template <typename T>
inline T nan_max(T a, T b) {
  return ((b > a) | (b != b)) ? b : a;  // bitwise |: no branch, so loops vectorise
}

template <typename T>
inline T combine_lanes_sum(T (&lanes)[kLanes]) {
  for (int64_t width = kLanes / 2; width > 0; width /= 2) {
    for (int64_t l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  }
  return lanes[0];
}

// Σ_{j<n} term(j), term j added into lane j mod kLanes, lanes combined pairwise.
template <typename T, typename Term>
inline T lane_sum(int64_t n, const Term& term) {
  T lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += term(j + l);
  }
  for (int64_t l = 0; j + l < n; ++l) lanes[l] += term(j + l);
  return combine_lanes_sum(lanes);
}

// max_{j<n} v[j] (NaN-propagating); -inf for n = 0.
template <typename T>
inline T lane_max(const T* v, int64_t n) {
  T lanes[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lanes[l] = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] = nan_max(lanes[l], v[j + l]);
  }
  for (int64_t l = 0; j + l < n; ++l) lanes[l] = nan_max(lanes[l], v[j + l]);
  T result = lanes[0];
  for (int64_t l = 1; l < kLanes; ++l) result = nan_max(result, lanes[l]);
  return result;
}

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  return lane_sum<T>(n, [&](int64_t j) { return a[j] * b[j]; });
}

// out[k] = dot(x, rows + k·d, d) for k < count, four rows per sweep over x (x is loaded
// once per four dot products). Bitwise the same as dot(): same lanes, same combine.
template <typename T>
inline void dot_rows(const T* x, const T* rows, int64_t count, int64_t d, T* out) {
  int64_t k = 0;
  for (; k + 4 <= count; k += 4) {
    const T* r0 = rows + k * d;
    const T* r1 = r0 + d;
    const T* r2 = r1 + d;
    const T* r3 = r2 + d;
    T a0[kLanes] = {}, a1[kLanes] = {}, a2[kLanes] = {}, a3[kLanes] = {};
    const auto step = [&](int64_t e, int64_t l) {
      const T v = x[e];
      a0[l] += v * r0[e];
      a1[l] += v * r1[e];
      a2[l] += v * r2[e];
      a3[l] += v * r3[e];
    };
    int64_t j = 0;
    for (; j + kLanes <= d; j += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) step(j + l, l);
    }
    for (int64_t l = 0; j + l < d; ++l) step(j + l, l);
    out[k] = combine_lanes_sum(a0);
    out[k + 1] = combine_lanes_sum(a1);
    out[k + 2] = combine_lanes_sum(a2);
    out[k + 3] = combine_lanes_sum(a3);
  }
  for (; k < count; ++k) out[k] = dot(x, rows + k * d, d);
}

template <typename T>
inline T sum_of_squares(const T* a, int64_t n) {
  return dot(a, a, n);
}

// Σ_j exp((v[j] − shift)·scale), the shifted sum of a log-sum-exp.
template <typename T>
inline T sum_exp(const T* v, int64_t n, T shift, T scale) {
  return lane_sum<T>(n, [&](int64_t j) { return vexp((v[j] - shift) * scale); });
}

// out[j] = factor·softmax_j(v·scale) for scale > 0 (out may alias v). The normaliser is
// recomputed from v with a max shift rather than taken from a saved log-sum-exp: at large
// |lse| the float rounding of a stored lse (|lse|·6e-8) would dominate the result.
template <typename T>
inline void scaled_softmax(const T* v, T* out, int64_t n, T scale, T factor) {
  const T top = lane_max(v, n);
  const T total = lane_sum<T>(n, [&](int64_t j) {
    const T e = vexp((v[j] - top) * scale);
    out[j] = e;
    return e;
  });
  const T normalise = factor / total;
  for (int64_t j = 0; j < n; ++j) out[j] *= normalise;
}

}  // namespace protoseg::cpu
