// Host build of csrc/cuda/sinkhorn_assign.cu through the CUDA emulation (same source, unchanged).
#include "cuda/sinkhorn_assign.cu"
