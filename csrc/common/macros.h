// Portability macros for math shared by the CPU and CUDA kernels.
#pragma once

#if defined(__CUDACC__) || defined(PROTOSEG_EMULATION)
#define PROTOSEG_HOST_DEVICE __host__ __device__
#else
#define PROTOSEG_HOST_DEVICE
#endif

#define PROTOSEG_INLINE PROTOSEG_HOST_DEVICE inline

namespace protoseg {

// x̂ = x / max(‖x‖, kNormEps), as F.normalize does.
constexpr double kNormEps = 1e-12;  // acc_t(kNormEps): exactly 1e-12 in fp64, as the reference

}  // namespace protoseg
