// Host build of csrc/cuda/ppc_ppd_loss.cu through the CUDA emulation (same source, unchanged).
#include "cuda/ppc_ppd_loss.cu"
