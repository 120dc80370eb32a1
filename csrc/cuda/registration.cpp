// Registers the CUDA kernels of this directory for CUDA tensors (backend `cuda`).
#include "cuda/registration.h"

TORCH_LIBRARY_IMPL(protoseg, CUDA, m) { protoseg::cuda::register_kernels(m); }
