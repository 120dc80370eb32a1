// Host build of csrc/cuda/prototype_similarity.cu through the CUDA emulation (same source, unchanged).
#include "cuda/prototype_similarity.cu"
