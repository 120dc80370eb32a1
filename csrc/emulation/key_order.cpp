// Host build of csrc/cuda/key_order.cu through the CUDA emulation (same source, unchanged).
#include "cuda/key_order.cu"
