// The one place where the CUDA kernels meet the platform: the CUDA runtime under nvcc,
// the host emulation (csrc/emulation) otherwise. Kernel sources include this header,
// never <cuda_runtime.h> or the emulation directly, and launch only through
// PROTOSEG_LAUNCH, so the same source builds for a GPU and for the tests on CPU.
#pragma once

#include <cstdint>

#if defined(PROTOSEG_EMULATION)
#include "emulation/cuda_emulation.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#endif

// PROTOSEG_LAUNCH(kernel, grid, block, stream, args...): launch `kernel` on `stream`
// (no dynamic shared memory: every kernel sizes its shared memory at compile time).
// An empty grid launches nothing, as CUDA would reject it. Under nvcc a failed launch
// raises a c10::Error (the launching file includes <c10/cuda/CUDAException.h>);
// kernels that take template arguments are named through a pointer or parentheses.
#if defined(PROTOSEG_EMULATION)
#define PROTOSEG_LAUNCH(kernel, grid, block, stream, ...)                             \
  do {                                                                                \
    const dim3 protoseg_grid_ = (grid);                                               \
    if (protoseg_grid_.x != 0 && protoseg_grid_.y != 0 && protoseg_grid_.z != 0) {    \
      (void)(stream);                                                                 \
      ::protoseg::emulation::launch(kernel, protoseg_grid_, (block), __VA_ARGS__);    \
    }                                                                                 \
  } while (0)
#else
#define PROTOSEG_LAUNCH(kernel, grid, block, stream, ...)                             \
  do {                                                                                \
    const dim3 protoseg_grid_ = (grid);                                               \
    if (protoseg_grid_.x != 0 && protoseg_grid_.y != 0 && protoseg_grid_.z != 0) {    \
      kernel<<<protoseg_grid_, (block), 0, (stream)>>>(__VA_ARGS__);                  \
      C10_CUDA_KERNEL_LAUNCH_CHECK();                                                 \
    }                                                                                 \
  } while (0)
#endif

#define PROTOSEG_DEVICE __device__ __forceinline__

namespace protoseg::cuda {

constexpr unsigned int kFullWarpMask = 0xffffffffu;
constexpr int kWarpSize = 32;

// Resident blocks per SM the small memory-bound kernels (256 threads) are compiled for,
// the second argument of their __launch_bounds__: it allows 64 registers per thread.
// Without it ptxas caps registers at the occupancy that shared memory allows (32 for
// these kernels) and spills where a kernel needs a few more.
constexpr int kSmallKernelBlocksPerSm = 4;

// Global index of the calling thread along x, in 64 bits (blockIdx.x * blockDim.x
// overflows 32 bits on large grids).
PROTOSEG_DEVICE int64_t global_thread_x() {
  return int64_t(blockIdx.x) * int64_t(blockDim.x) + int64_t(threadIdx.x);
}

}  // namespace protoseg::cuda
