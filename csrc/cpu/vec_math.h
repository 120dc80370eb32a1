// Eight-lane float math for CPU kernels that are bound by transcendental functions: AVX2 + FMA
// vectors, with exp and log from the SLEEF library that libtorch_cpu exports (1-ulp variants,
// the ones ATen's own vectorised exp/log use). Functions carry their target attribute, so the
// translation unit needs no -mavx2: callers check has_avx2() at run time and keep a scalar
// path for other CPUs. PROTOSEG_CPU_SIMD=off (read once, at the first call) forces the scalar
// paths, so that the tests run them on this CPU too.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PROTOSEG_HAVE_AVX2_PATH 1
#include <immintrin.h>

#include <cstdlib>
#include <cstring>

extern "C" {
__m256 Sleef_expf8_u10(__m256);
__m256 Sleef_logf8_u10(__m256);
}

#define PROTOSEG_AVX2 __attribute__((target("avx2,fma")))

namespace protoseg::cpu::vec {

inline bool has_avx2() {
  static const bool supported = [] {
    const char* setting = std::getenv("PROTOSEG_CPU_SIMD");
    if (setting != nullptr && std::strcmp(setting, "off") == 0) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return supported;
}

PROTOSEG_AVX2 inline __m256 is_nan(__m256 x) { return _mm256_cmp_ps(x, x, _CMP_UNORD_Q); }

// Lanes where v replaces best: strictly smaller (larger), or v the first NaN (replaces_min /
// replaces_max of csrc/common, lane-wise).
PROTOSEG_AVX2 inline __m256 replaces_min(__m256 v, __m256 best) {
  return _mm256_or_ps(_mm256_cmp_ps(v, best, _CMP_LT_OQ), _mm256_andnot_ps(is_nan(best), is_nan(v)));
}
PROTOSEG_AVX2 inline __m256 replaces_max(__m256 v, __m256 best) {
  return _mm256_or_ps(_mm256_cmp_ps(v, best, _CMP_GT_OQ), _mm256_andnot_ps(is_nan(best), is_nan(v)));
}

// (σ(s), σ(−s)) from one exp and without cancellation: with e = exp(−|s|), σ(|s|) = 1/(1 + e)
// and σ(−|s|) = e/(1 + e). NaN gives NaN in both.
struct SigmoidPair {
  __m256 of_s, of_minus_s;
};
PROTOSEG_AVX2 inline SigmoidPair sigmoid_pair(__m256 s) {
  const __m256 magnitude = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), s);
  const __m256 e = Sleef_expf8_u10(_mm256_sub_ps(_mm256_setzero_ps(), magnitude));
  const __m256 inverse = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
  const __m256 large = inverse, small = _mm256_mul_ps(e, inverse);
  const __m256 negative = _mm256_cmp_ps(s, _mm256_setzero_ps(), _CMP_LT_OQ);
  return {_mm256_blendv_ps(large, small, negative), _mm256_blendv_ps(small, large, negative)};
}

// base^γ for the focal weights: γ = 2 a square (as torch.pow), else exp(γ·log base), which
// is 0 for base 0 and NaN for NaN. γ = 0 is handled by the callers (no weight at all).
PROTOSEG_AVX2 inline __m256 focal_power(__m256 base, float gamma) {
  if (gamma == 2.0f) return _mm256_mul_ps(base, base);
  return Sleef_expf8_u10(_mm256_mul_ps(_mm256_set1_ps(gamma), Sleef_logf8_u10(base)));
}

}  // namespace protoseg::cpu::vec
#endif
