// Inverse l2 norms 1 / max(‖v‖, eps) of the rows of a matrix (docs/spec.md §2), computed once
// per launch sequence and read by every tile that needs x̂ or P̂.
#pragma once

#include "cuda/host.h"
#include "cuda/warp_reduce.cuh"

namespace protoseg::cuda {

constexpr int kRowsPerBlock = 8;  // one warp per row
constexpr int kRowThreads = kRowsPerBlock * kWarpSize;

PROTOSEG_DEVICE int64_t global_warp_index() {
  return int64_t(blockIdx.x) * (int64_t(blockDim.x) / kWarpSize) + warp_index();
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kRowThreads, kSmallKernelBlocksPerSm)
    inverse_norms_kernel(const scalar_t* rows, int64_t count, int64_t length, acc_t* inverse) {
  const int64_t row = global_warp_index();
  if (row >= count) return;  // uniform over the warp
  const acc_t sum_sq = warp_row_sum_squares<acc_t>(rows + row * length, length);
  if (lane_index() == 0) inverse[row] = inverse_norm(sum_sq);
}

// [rows] inverse norms of a contiguous [rows, length] tensor, in acc_t; an undefined
// tensor when `normalize` is false (kernels then use the raw vectors).
template <typename scalar_t, typename acc_t>
at::Tensor inverse_norms(const at::Tensor& matrix, int64_t rows, int64_t length, bool normalize,
                         cudaStream_t stream) {
  if (!normalize) return at::Tensor();
  at::Tensor inverse = at::empty({rows}, matrix.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  PROTOSEG_LAUNCH((inverse_norms_kernel<scalar_t, acc_t>), grid_for(rows, kRowsPerBlock), dim3(kRowThreads),
                  stream, data<scalar_t>(matrix), rows, length, mutable_data<acc_t>(inverse));
  return inverse;
}

template <typename acc_t>
const acc_t* data_if_defined(const at::Tensor& t) {
  return t.defined() ? data<acc_t>(t) : nullptr;
}

}  // namespace protoseg::cuda
