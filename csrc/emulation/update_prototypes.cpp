// Host build of csrc/cuda/update_prototypes.cu through the CUDA emulation (same source, unchanged).
#include "cuda/update_prototypes.cu"
