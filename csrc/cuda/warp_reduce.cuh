// Warp- and block-level reductions through shuffles, in a fixed order (a butterfly
// over the lanes), so results are bitwise reproducible.
#pragma once

#include "cuda/numeric.cuh"

namespace protoseg::cuda {

PROTOSEG_DEVICE int lane_index() { return int(threadIdx.x) % kWarpSize; }
PROTOSEG_DEVICE int warp_index() { return int(threadIdx.x) / kWarpSize; }

// Sum over the 32 lanes; every lane receives the total. All lanes must call it.
template <typename T>
PROTOSEG_DEVICE T warp_sum(T value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(kFullWarpMask, value, offset);
  }
  return value;
}

// Inclusive prefix sum over the lanes (lane l gets the sum of lanes 0..l).
template <typename T>
PROTOSEG_DEVICE T warp_inclusive_scan(T value) {
  const int lane = lane_index();
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const T below = __shfl_up_sync(kFullWarpMask, value, offset);
    if (lane >= offset) value += below;
  }
  return value;
}

// Σ row[i]² over a row of `length` elements, lanes striding over the row; every lane
// receives the total. The one definition of a row's squared norm for all kernels, so
// the norm used in a forward pass and in its backward are bitwise the same.
template <typename acc_t, typename scalar_t>
PROTOSEG_DEVICE acc_t warp_row_sum_squares(const scalar_t* row, int64_t length) {
  acc_t sum = acc_t(0);
  for (int64_t i = lane_index(); i < length; i += kWarpSize) {
    const acc_t v = to_acc(row[i]);
    sum += v * v;
  }
  return warp_sum(sum);
}

}  // namespace protoseg::cuda
