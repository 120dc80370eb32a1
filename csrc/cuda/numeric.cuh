// Element types of the CUDA kernels: loads convert to the accumulation type (float, or
// double for double inputs), stores round back to the element type. Half types are
// storage only; all arithmetic happens in the accumulation type.
#pragma once

// The platform first: under the emulation it defines the CUDA qualifiers that the
// shared math of csrc/common is annotated with.
#include "cuda/portable.cuh"
// (keep this order)
#include "common/math.h"

namespace protoseg::cuda {

template <typename scalar_t>
struct Accumulate {
  using type = float;
};
template <>
struct Accumulate<double> {
  using type = double;
};
template <typename scalar_t>
using acc_type = typename Accumulate<scalar_t>::type;

PROTOSEG_DEVICE float to_acc(float v) { return v; }
PROTOSEG_DEVICE double to_acc(double v) { return v; }
PROTOSEG_DEVICE float to_acc(__half v) { return __half2float(v); }
PROTOSEG_DEVICE float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename scalar_t>
struct Store;
template <>
struct Store<float> {
  PROTOSEG_DEVICE static float from(float v) { return v; }
};
template <>
struct Store<double> {
  PROTOSEG_DEVICE static double from(double v) { return v; }
};
template <>
struct Store<__half> {
  PROTOSEG_DEVICE static __half from(float v) { return __float2half_rn(v); }
};
template <>
struct Store<__nv_bfloat16> {
  PROTOSEG_DEVICE static __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

// Rounds an accumulated value to the element type scalar_t.
template <typename scalar_t, typename acc_t>
PROTOSEG_DEVICE scalar_t from_acc(acc_t v) {
  return Store<scalar_t>::from(v);
}

}  // namespace protoseg::cuda
